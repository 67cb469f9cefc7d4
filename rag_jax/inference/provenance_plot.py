"""Pictures of provenance (the paper's Figure 2): per question, the document posterior of every generated token as a
heatmap (documents down, tokens across, as in the paper), and each document's prior p(z|x) beside its posterior
p(z|x,y) as bars. Drawn from records' "provenance" (provenance.py), so a picture shows exactly what the JSON says.
"""

from __future__ import annotations

import html
import io
from typing import Any, BinaryIO, NamedTuple, Sequence

import numpy as np

FORMATS = (".png", ".svg", ".html")
_TITLE_CHARS = 32


class PlotData(NamedTuple):
    posteriors_TxK: np.ndarray  # one row per generated token, one column per document (retrieval order)
    tokens: list[str]
    titles: list[str]  # "rank. title" per document
    prior_K: np.ndarray
    posterior_K: np.ndarray


def plot_data(record: dict[str, Any]) -> PlotData:
    """What the picture of one answered question shows, from its record."""
    prov = record["provenance"]
    docs, rows = prov["documents"], prov["tokens"]
    short = [d["title"] if len(d["title"]) <= _TITLE_CHARS else d["title"][: _TITLE_CHARS - 1] + "…" for d in docs]
    return PlotData(
        posteriors_TxK=np.array([row["posteriors"] for row in rows], np.float64).reshape(len(rows), len(docs)),
        tokens=[row["token"].strip() or repr(row["token"]) for row in rows],
        titles=[f"{rank + 1}. {title}" for rank, title in enumerate(short)],
        prior_K=np.array([d["prior"] for d in docs]),
        posterior_K=np.array([d["posterior"] for d in docs]),
    )


def draw(records: Sequence[dict[str, Any]]):
    """A matplotlib Figure with one row of two panels per record: the token x document posterior heatmap (its image
    array is the transposed PlotData.posteriors_TxK) and the prior / posterior bars."""
    import matplotlib  # pylint: disable=g-import-not-at-top (only pictures need it)

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

    data = [plot_data(r) for r in records]
    width = max(8.0, 4.5 + 0.45 * max(len(d.tokens) for d in data))
    heights = [1.4 + 0.35 * len(d.titles) for d in data]
    figure, axes = pyplot.subplots(len(data), 2, figsize=(width + 4, sum(heights) + 0.6 * len(data)), squeeze=False,
                                   gridspec_kw={"width_ratios": [width, 4], "height_ratios": heights})  # fmt: skip
    for (heat, bars), record, d in zip(axes, records, data):
        image = heat.imshow(d.posteriors_TxK.T, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0)
        heat.set_xticks(range(len(d.tokens)), d.tokens, rotation=45, ha="right")
        heat.set_yticks(range(len(d.titles)), d.titles)
        heat.set_title(f"{record['question']}  →  {record['prediction']}", loc="left", fontsize=10)
        figure.colorbar(image, ax=heat, fraction=0.03, pad=0.01, label="p(z | x, y_t, y_<t)")
        positions = np.arange(len(d.titles))
        bars.barh(positions - 0.2, d.prior_K, height=0.4, color="0.7", label="prior p(z|x)")
        bars.barh(positions + 0.2, d.posterior_K, height=0.4, color="tab:blue", label="posterior p(z|x,y)")
        bars.set_yticks(positions, [t.split(".", 1)[0] for t in d.titles])
        bars.set_ylim(len(d.titles) - 0.5, -0.5)  # top to bottom in retrieval order, as the heatmap
        bars.set_xlim(0.0, 1.0)
        bars.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def write(records: Sequence[dict[str, Any]], file: BinaryIO, extension: str):
    """Writes the picture of `records` to a binary `file` as `extension` says (.png, .svg, or .html with the SVG
    inline); returns the Figure (its data is what was drawn)."""
    if extension not in FORMATS:
        raise ValueError(f"a picture is written as one of {', '.join(FORMATS)}, not {extension!r}")
    figure = draw(records)
    if extension == ".html":
        svg = io.StringIO()
        figure.savefig(svg, format="svg")
        questions = "".join(f"<li>{html.escape(r['question'])}: <b>{html.escape(r['prediction'])}</b></li>"
                            for r in records)  # fmt: skip
        file.write(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>RAG provenance</title></head><body>"
                   f"<ul>{questions}</ul>\n{svg.getvalue()}</body></html>\n".encode("utf-8"))  # fmt: skip
    else:
        figure.savefig(file, format=extension[1:], dpi=110)
    return figure
