"""The sweep's self-contained HTML report: the paper's Figure 3 and Table 3 redone on our model, with what the
paper could not show (per-layer entropy, eigenvalue spectra, output shift), all read from DIR/results.json;
and the `entropy` command's page.

One file, readable offline: plotly.js is inlined once (in the first figure) and nothing refers to the network.
A section whose data the sweep did not record is replaced by a one-line note, never an error.

The modules follow the page: `summary` (the findings), `laws` (Figs. 3a, 3b, Table 3), `chance`, `prediction`,
`entropy`, `spectra`, `shift`, `settings` (settings and raw numbers); `page` assembles them, with `markup` (HTML
and number formats) and `style` (order and colours) shared by all; `layers` draws the per-layer figures the
report, the `entropy` command's page (`entropy_page`) and the notebooks share.
"""

from analyses.report.entropy_page import entropy_report_html
from analyses.report.page import REPORT_FILE, build_report, render_report

__all__ = ["REPORT_FILE", "build_report", "entropy_report_html", "render_report"]
