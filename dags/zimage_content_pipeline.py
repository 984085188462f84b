"""
### zimage_content_pipeline: product rows in, product shots, a contact sheet and a gallery out

1. `read_products` reads the product rows shipped with this DAG (`data/products.csv`, or the CSV file
   named by the `ZIMAGE_PRODUCTS_CSV` environment variable: your product table).
2. `build_requests` turns each row into the keyword arguments of one image request, in Python: the size
   comes from the run's params and each product's seed from its SKU (so a product always gets the same
   picture), and mapped values reach the operator as real integers. Airflow renders Jinja inside values
   mapped with `expand_kwargs`, so each prompt is wrapped in `airflow.sdk.literal()`: a table cell
   `{{ conn.zimage_default.password }}` stays that text instead of becoming the API key.
3. `generate` maps `ZImageGenerateOperator` over those requests with `expand_kwargs`: one task instance
   per product, each retried, reused and paid for on its own. `reuse="content"`: a product whose
   request (prompt, seed, size, model, connection) was stored by an earlier run under the same output
   path is copied from it, not generated again, so tomorrow's run pays only for the rows that changed.
4. `contact_sheet` reads every image back through `ObjectStoragePath` (from the URIs in the manifest
   entries the operator returned) and writes `contact_sheet.png` (one PNG grid, Pillow) and
   `gallery.html` into the run's folder, next to the images:
   `{output_path}/zimage_content_pipeline/{run_id}/`.

The backend comes from the `zimage_default` connection (Runware API key, or the extra
`{"backend": "local"}` for diffusers on this worker). Trigger with `{"size": 512}` to change the size.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
import zlib
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, ObjectStoragePath, Param, literal, task

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

PRODUCTS_CSV = Path(__file__).parent / "data" / "products.csv"
# Z-Image is made for 1024x1024; `make demo` sets 256 for its tiny CPU model. The run's `size` param
# overrides it per run.
DEFAULT_SIZE = int(os.environ.get("ZIMAGE_IMAGE_SIZE", "1024"))
PROMPT = (
    "Studio product photograph of a {color} {material} {name} {setting}, soft diffused light, "
    "sharp focus, catalogue style"
)
NEGATIVE_PROMPT = "text, watermark, logo, blurry, distorted"
THUMBNAIL = 256  # pixels per contact-sheet cell
CAPTION = 28  # pixels of caption under each cell
GUTTER = 8  # pixels between cells


def _gallery_html(run_name: str, shots: list[tuple[dict[str, str], dict[str, Any]]]) -> str:
    """A self-contained page whose links are relative, so the folder can be copied or served as is."""
    figures = []
    for product, entry in shots:
        # The image sits at {task_id}/{map_index}/{name} below the run folder the page is written to.
        relative = "/".join(entry["uri"].rsplit("/", 3)[1:])
        cost = "n/a" if entry.get("cost") is None else f"${entry['cost']:.4f}"
        figures.append(
            f'<figure><a href="{html.escape(relative)}"><img src="{html.escape(relative)}" '
            f'alt="{html.escape(product["name"])}" loading="lazy"></a><figcaption>'
            f"<b>{html.escape(product['sku'])}</b> {html.escape(product['name'])}<br>"
            f"{entry['width']}x{entry['height']} {html.escape(entry['format'])}, seed {entry['seed']}, "
            f"{cost}<br><code>sha256 {html.escape(entry['sha256'][:16])}</code></figcaption></figure>"
        )
    total = sum(entry.get("cost") or 0.0 for _, entry in shots)
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>zimage_content_pipeline {html.escape(run_name)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2rem;background:#fafafa}"
        ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:1.5rem}"
        "figure{margin:0;background:#fff;padding:.5rem;box-shadow:0 1px 3px #0002}"
        "img{width:100%;height:auto;display:block}figcaption{font-size:.8rem;color:#333;margin-top:.4rem}"
        "</style></head><body>\n"
        f"<h1>zimage_content_pipeline</h1><p>Run <code>{html.escape(run_name)}</code>: "
        f"{len(shots)} image(s), total cost ${total:.4f}. "
        "<a href='contact_sheet.png'>Contact sheet</a></p>\n"
        f"<div class='grid'>\n{chr(10).join(figures)}\n</div></body></html>\n"
    )


with DAG(
    dag_id="zimage_content_pipeline",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["zimage", "example"],
    doc_md=__doc__,
    params={
        "size": Param(
            DEFAULT_SIZE,
            type="integer",
            minimum=128,
            maximum=2048,
            multipleOf=16,
            description="Width and height of every image, in pixels (a multiple of 16).",
        ),
    },
):

    @task
    def read_products() -> list[dict[str, str]]:
        source = Path(os.environ.get("ZIMAGE_PRODUCTS_CSV") or PRODUCTS_CSV)
        with source.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    @task
    def build_requests(
        products: list[dict[str, str]], params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """One dict of operator arguments per product; the keys must be ZImageGenerateOperator arguments."""
        size = int((params or {}).get("size") or DEFAULT_SIZE)
        return [
            {
                # Table data, not a template: literal() keeps Airflow from rendering `{{ ... }}` in a
                # cell (a secret, or an error) when it renders the mapped prompt.
                "prompt": literal(PROMPT.format(**product)),
                # crc32 of the SKU: stable across runs and machines (Python's hash() is salted per process).
                "seed": zlib.crc32(product["sku"].encode()),
                "width": size,
                "height": size,
            }
            for product in products
        ]

    products = read_products()
    images = ZImageGenerateOperator.partial(
        task_id="generate",
        model="runware:z-image@turbo",
        negative_prompt=NEGATIVE_PROMPT,
        output_format="JPG",
        # The seed comes from the SKU, so an unchanged row is the same picture: reuse it, pay nothing.
        reuse="content",
        # Label each mapped instance by its product's SKU in the UI (the operator's default label is
        # the start of the prompt); build_requests keeps the order of read_products.
        map_index_template="{{ ti.xcom_pull(task_ids='read_products')[ti.map_index]['sku'] }}",
    ).expand_kwargs(build_requests(products))

    @task
    def contact_sheet(products: list[dict[str, str]], images: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """Write contact_sheet.png and gallery.html next to the images, reading them by URI.

        `images` holds one list of manifest entries per mapped task, in map-index order, so it lines up
        with `products`. An image dropped by `on_nsfw="skip"` just leaves its product out.
        """
        from PIL import Image, ImageDraw, ImageOps

        # `images[:]` fetches every mapped result in one call; plain iteration would probe one index past
        # the end, which Airflow logs as an (harmless) "XCom not found" error.
        per_task = images[:]
        shots = [
            (product, entry) for product, entries in zip(products, per_task, strict=True) for entry in entries
        ]
        if not shots:
            raise ValueError("no images were generated: nothing to put on a contact sheet")
        # Layout {output_path}/{dag_id}/{run_id}/{task_id}/{map_index}/{image}: three levels up is the run.
        run_dir = ObjectStoragePath(shots[0][1]["uri"]).parent.parent.parent

        columns = math.ceil(math.sqrt(len(shots)))
        rows = math.ceil(len(shots) / columns)
        cell_w, cell_h = THUMBNAIL + GUTTER, THUMBNAIL + CAPTION + GUTTER
        sheet = Image.new("RGB", (columns * cell_w + GUTTER, rows * cell_h + GUTTER), "white")
        draw = ImageDraw.Draw(sheet)
        for index, (product, entry) in enumerate(shots):
            with ObjectStoragePath(entry["uri"]).open("rb") as handle:
                image = Image.open(io.BytesIO(handle.read())).convert("RGB")
            thumb = ImageOps.contain(image, (THUMBNAIL, THUMBNAIL))
            x = GUTTER + (index % columns) * cell_w
            y = GUTTER + (index // columns) * cell_h
            sheet.paste(thumb, (x + (THUMBNAIL - thumb.width) // 2, y + (THUMBNAIL - thumb.height) // 2))
            draw.text((x, y + THUMBNAIL + 8), f"{product['sku']}  {product['name']}", fill="black")
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        sheet_path = run_dir / "contact_sheet.png"
        sheet_path.write_bytes(buffer.getvalue())

        gallery_path = run_dir / "gallery.html"
        gallery_path.write_text(_gallery_html(run_dir.name, shots))
        print(f"Contact sheet: {sheet_path}")
        print(f"Gallery:       {gallery_path}")
        return {"contact_sheet": str(sheet_path), "gallery": str(gallery_path), "images": len(shots)}

    contact_sheet(products, images.output)
