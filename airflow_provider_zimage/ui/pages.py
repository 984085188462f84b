"""The HTML of the views: plain server-rendered pages, shown by the Airflow UI in its plugin iframe.

No JavaScript framework and no build step: the page is a grid of `<img loading="lazy">` thumbnails, so
the browser fetches only what scrolls into view, and a page of cards is bounded by pagination however
many images the run has. Every value from a manifest is escaped; prompts are shown as wrapped text.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from urllib.parse import quote, urlencode

from airflow_provider_zimage.storage.spend import DaySpend
from airflow_provider_zimage.ui.gallery import Card, Failure, RunImages

__all__ = ["error_page", "format_cost", "run_page", "spend_page"]

_STYLE = """
:root{color-scheme:light dark;--fg:#1a202c;--muted:#4a5568;--bg:#fff;--card:#f7fafc;
--line:#e2e8f0}
@media (prefers-color-scheme:dark){:root{--fg:#e2e8f0;--muted:#a0aec0;--bg:#1a202c;--card:#2d3748;
--line:#4a5568}}
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1rem;color:var(--fg);background:var(--bg)}
h1{font-size:1.2rem;margin:0 0 .3rem}.summary{color:var(--muted);margin:0 0 1rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:1rem}
figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:6px;padding:.5rem}
figure img{display:block;width:100%;height:auto;aspect-ratio:var(--ratio,1);object-fit:contain;
background:#0001}
figcaption{font-size:.8rem;margin-top:.4rem}
.prompt{white-space:pre-wrap;overflow-wrap:anywhere;margin:.2rem 0}.neg{color:var(--muted)}
dl{display:grid;grid-template-columns:auto 1fr;gap:0 .6rem;margin:.3rem 0 0}dt{color:var(--muted)}dd{margin:0}
.nsfw{background:#c53030;color:#fff;border-radius:3px;padding:0 .3rem;font-weight:600}
nav.pages{margin:1rem 0;display:flex;gap:.6rem;align-items:center;flex-wrap:wrap}
table{border-collapse:collapse;margin:.5rem 0 1rem}
td,th{border:1px solid var(--line);padding:.25rem .5rem;text-align:left;vertical-align:top}
td.num,th.num{text-align:right}.failed td{white-space:pre-wrap;overflow-wrap:anywhere}
a{color:#3182ce}
"""


def format_cost(cost: float | None) -> str:
    """USD with up to six decimals (Runware bills fractions of a cent), at least two."""
    if cost is None:
        return "n/a"
    text = f"{cost:.6f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _q(value: str) -> str:
    return quote(value, safe="")


def _document(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _card(card: Card, files: str) -> str:
    where = f"{_q(card.task_segment)}/{_q(card.map_segment)}/{_q(card.name)}"
    full, thumb = f"{files}/images/{where}", f"{files}/thumbnails/{where}"
    ratio = f"{card.width}/{card.height}" if card.width and card.height else "1"
    label = card.task_id if card.map_index < 0 else f"{card.task_id}[{card.map_index}]"
    negative = ""
    if card.negative_prompt:
        negative = f"<p class='prompt neg'><b>Negative:</b> {_e(card.negative_prompt)}</p>"
    cost = "" if card.cost is None else card.cost
    nsfw = "<span class='nsfw'>NSFW</span>" if card.nsfw else "no"
    return (
        f"<figure class='card' data-cost='{cost}' data-nsfw='{str(card.nsfw).lower()}'>"
        f"<a href='{_e(full)}' target='_blank' rel='noopener'>"
        f"<img class='thumb' loading='lazy' decoding='async' src='{_e(thumb)}' style='--ratio:{ratio}' "
        f"alt='{_e(card.prompt[:120])}'></a><figcaption>"
        f"<p class='prompt'>{_e(card.prompt)}</p>{negative}<dl>"
        f"<dt>Seed</dt><dd>{_e(card.seed)}</dd><dt>Model</dt><dd>{_e(card.model)}</dd>"
        f"<dt>Size</dt><dd>{card.width}x{card.height} {_e(card.format)}</dd>"
        f"<dt>Cost</dt><dd>{_e(format_cost(card.cost))}</dd><dt>NSFW</dt><dd>{nsfw}</dd>"
        f"<dt>Task</dt><dd>{_e(label)}</dd>"
        f"<dt>File</dt><dd><a href='{_e(full)}' target='_blank' rel='noopener'>{_e(card.name)}</a></dd>"
        "</dl></figcaption></figure>"
    )


def _failures(failures: Sequence[Failure]) -> str:
    if not failures:
        return ""
    rows = "".join(
        f"<tr><td>{_e(f.task_id if f.map_index < 0 else f'{f.task_id}[{f.map_index}]')}</td>"
        f"<td>{_e(f.prompt)}</td><td>{_e(f.reason)}</td></tr>"
        for f in failures
    )
    return (
        f"<h2 id='failed'>Failed requests ({len(failures)})</h2><table class='failed'>"
        f"<tr><th>Task</th><th>Prompt</th><th>Reason</th></tr>{rows}</table>"
    )


def _pager(page: int, pages: int, per_page: int, here: str, query: Mapping[str, object]) -> str:
    if pages <= 1:
        return ""

    def link(number: int, text: str) -> str:
        # One encoder for the whole query: what narrows the page (map_index) stays on every link.
        target = f"{here}?{urlencode({**query, 'page': number, 'per_page': per_page})}"
        return f"<a href='{_e(target)}'>{_e(text)}</a>"

    parts = []
    if page > 1:
        parts += [link(1, "« first"), link(page - 1, "‹ previous")]
    parts.append(f"<span class='where'>page {page} of {pages}</span>")
    if page < pages:
        parts += [link(page + 1, "next ›"), link(pages, "last »")]
    return f"<nav class='pages'>{''.join(parts)}</nav>"


_HINTS = {
    401: "Your Airflow session has ended: log in to Airflow again, then reopen this tab.",
    403: "Your Airflow role may not read this DAG's task instances, so its images are not shown either.",
    404: "Nothing is stored here: the run, task or file may have been deleted, or the link is wrong.",
}


def error_page(status: int, message: str) -> str:
    """What the tab shows instead of a raw JSON refusal: the status, Airflow's or our reason, a hint."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    hint = _HINTS.get(status, "")
    body = (
        f"<h1>{status} {_e(phrase)}</h1><p class='summary' id='error' data-status='{status}'>"
        f"{_e(message)}</p>" + (f"<p>{_e(hint)}</p>" if hint else "")
    )
    return _document(f"{status} {phrase}", body)


def run_page(
    run: RunImages,
    *,
    files: str,
    here: str,
    page: int,
    per_page: int,
    scope: str,
    all_url: str | None = None,
    query: Mapping[str, object] | None = None,
) -> str:
    """The Images tab: header with count and total cost, failed requests, then one page of cards.

    `files` is the run's URL in this app (thumbnails and images hang below it), `here` this page's own
    path without a query (for the pager), `query` the parameters every page of it keeps (`map_index`),
    `scope` what the page covers ("run", "task generate", ...).
    """
    pages = run.pages(per_page)
    page = min(max(page, 1), pages)
    cards = run.page(page, per_page)
    nsfw_skipped = f", {run.skipped_nsfw} skipped as NSFW" if run.skipped_nsfw else ""
    failed = f", <a href='#failed'>{len(run.failures)} failed</a>" if run.failures else ""
    widen = f" <a href='{_e(all_url)}'>all map indexes</a>" if all_url else ""
    header = (
        f"<h1>Z-Image images of {_e(scope)}</h1>"
        f"<p class='summary' id='summary' data-count='{run.count}' data-total-cost='{run.total_cost}' "
        f"data-failed='{len(run.failures)}'><b>{run.count}</b> image(s) in {run.manifests} manifest(s), "
        f"total cost <b class='total-cost'>{_e(format_cost(run.total_cost))}</b>{failed}{nsfw_skipped}."
        f" DAG <code>{_e(run.dag_id)}</code>, run <code>{_e(run.run_id)}</code>.{widen}</p>"
    )
    if not run.manifests:
        body = header + "<p>No manifest yet: images appear here once a Z-Image task has stored them.</p>"
        return _document(f"Images of {run.run_id}", body)
    pager = _pager(page, pages, per_page, here, query or {})
    grid = "".join(_card(card, files) for card in cards)
    body = f"{header}{_failures(run.failures)}{pager}<div class='grid'>{grid}</div>{pager}"
    return _document(f"Images of {run.run_id}", body)


def spend_page(rows: Sequence[DaySpend], *, days: int, ui_base: str) -> str:
    """Z-Image spend: images, failed requests and cost per DAG per day, newest first, with totals."""
    per_dag: dict[str, DaySpend] = {}
    for row in rows:
        total = per_dag.setdefault(row.dag_id, DaySpend(day="", dag_id=row.dag_id))
        total.images += row.images
        total.failed += row.failed
        total.cost = round(total.cost + row.cost, 6)
        total.runs += row.runs

    def dag_link(dag_id: str) -> str:
        return f"<a href='{_e(ui_base)}/dags/{_e(_q(dag_id))}' target='_top'>{_e(dag_id)}</a>"

    daily = "".join(
        f"<tr><td>{_e(r.day)}</td><td>{dag_link(r.dag_id)}</td><td class='num'>{r.runs}</td>"
        f"<td class='num'>{r.images}</td><td class='num'>{r.failed}</td>"
        f"<td class='num'>{_e(format_cost(r.cost))}</td></tr>"
        for r in rows
    )
    totals = "".join(
        f"<tr><td>{dag_link(t.dag_id)}</td><td class='num'>{t.images}</td><td class='num'>{t.failed}</td>"
        f"<td class='num'>{_e(format_cost(t.cost))}</td></tr>"
        for t in sorted(per_dag.values(), key=lambda t: -t.cost)
    )
    grand = round(sum(t.cost for t in per_dag.values()), 6)
    images = sum(t.images for t in per_dag.values())
    body = (
        f"<h1>Z-Image spend, last {days} days</h1>"
        f"<p class='summary' id='summary' data-images='{images}' data-total-cost='{grand}'><b>{images}</b> "
        f"image(s), total <b>{_e(format_cost(grand))}</b> (UTC days; DAGs you may read).</p>"
    )
    if not rows:
        return _document("Z-Image spend", body + "<p>No Z-Image task stored images in this period.</p>")
    body += (
        "<h2>Per DAG</h2><table id='per-dag'><tr><th>DAG</th><th class='num'>Images</th>"
        f"<th class='num'>Failed</th><th class='num'>Cost</th></tr>{totals}</table>"
        "<h2>Per DAG per day</h2><table id='per-day'><tr><th>Day</th><th>DAG</th><th class='num'>Runs</th>"
        "<th class='num'>Images</th><th class='num'>Failed</th><th class='num'>Cost</th></tr>"
        f"{daily}</table>"
    )
    return _document("Z-Image spend", body)
