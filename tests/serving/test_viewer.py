"""The web viewer in a real browser (Debian's chromium, driven by Playwright): paste a
key, upload a micrograph, see boxes and masks over it, material, grade and the table."""

from __future__ import annotations

import pytest

from .conftest import png_bytes, synthetic_image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_upload_shows_overlay_and_table(browser, served, tmp_path):
    pixels, nm = synthetic_image(seed=4, size=256)
    path = tmp_path / "micrograph.png"
    path.write_bytes(png_bytes(pixels))
    page = browser.new_page()
    page.goto(served["url"] + "/")
    page.fill("#key", served["env"]["analyze_key"])
    page.set_input_files("#file", str(path))
    page.select_option("#modality", "SEM")
    page.fill("#pixel_size", str(nm))
    page.click("#analyze")
    page.wait_for_selector("#status:has-text('done')", timeout=120_000)
    rows = page.locator("#measurements tbody tr")
    n = rows.count()
    assert n > 0
    # one row per defect (detections stitched across tile borders, as the batch job counts them)
    summary = page.locator("#summary").inner_text()
    assert summary.startswith(f"{n} defects (from ") and int(summary.split("from ")[1].split(" ")[0]) >= n
    assert page.locator("#material").inner_text().startswith("material: ")
    assert page.locator("#grade").inner_text().startswith("grade: ")
    headers = page.locator("#measurements thead th").all_inner_texts()
    assert "area µm²" in headers and "eq. diameter nm" in headers and "tile pieces" in headers
    # the overlay canvases hold the boxes and masks, drawn over the image's pixels
    painted = page.evaluate("""() => ['image', 'masks', 'boxes'].map(id => {
        const c = document.getElementById(id);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return [c.width, c.height, n];
    })""")
    (iw, ih, image_px), (_, _, mask_px), (_, _, box_px) = painted
    assert (iw, ih) == (256, 256) and image_px == 256 * 256
    assert mask_px > 0 and box_px > 0
    # a wrong key shows the API's refusal
    page.fill("#key", "gf_k0_wrong")
    page.click("#analyze")
    page.wait_for_selector("#status.error", timeout=60_000)
    assert page.locator("#status").inner_text().startswith("401")
    page.close()


def test_a_16_bit_tiff_is_shown_with_its_contrast(browser, served, tmp_path):
    """Browsers decode no TIFF and only the top 8 bits of a 16-bit PNG: the viewer draws
    the server's 8-bit preview, so a 12-bit TIFF is an image, not a grey box; the
    modality and pixel size come from the file (`from the file` is the default)."""
    import tifffile

    pixels, nm = synthetic_image(seed=5, size=256)
    twelve_bit = (pixels.astype("float64") / max(1, pixels.max()) * 4095).astype("uint16")  # 12 bits of signal
    path = tmp_path / "micrograph.tif"
    tifffile.imwrite(path, twelve_bit, resolution=(1e7 / nm, 1e7 / nm), resolutionunit="CENTIMETER")
    page = browser.new_page()
    page.add_init_script("""window.formKeys = []; const append = FormData.prototype.append;
        FormData.prototype.append = function (k, ...rest) { window.formKeys.push(k); return append.call(this, k, ...rest); };""")
    page.goto(served["url"] + "/")
    page.fill("#key", served["env"]["analyze_key"])
    page.set_input_files("#file", str(path))
    page.click("#analyze")
    page.wait_for_selector("#status:has-text('done')", timeout=120_000)
    spread = page.evaluate("""() => {
        const c = document.getElementById('image');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0; for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
        return [c.width, c.height, lo, hi];
    }""")
    assert spread[:2] == [256, 256] and spread[3] - spread[2] > 150, spread  # full contrast, not flat grey
    keys = page.evaluate("() => window.formKeys")
    assert "image" in keys and "modality" not in keys, keys  # the file's modality, not the select's
    page.close()


def test_non_square_pixels_are_shown_with_their_physical_shape(browser, served, tmp_path):
    """A TIFF of 128 rows x 256 columns at 20 nm x 10 nm pixels covers a square of the
    sample: the viewer shows it square (rows drawn twice as tall), overlays on top of it."""
    import tifffile

    pixels, _ = synthetic_image(seed=6, size=256)
    rows = pixels[::2]  # every other row: 20 nm apart where columns are 10 nm
    path = tmp_path / "stretched.tif"
    tifffile.imwrite(path, rows, resolution=(1e7 / 10, 1e7 / 20), resolutionunit="CENTIMETER")  # (x, y) px/cm
    page = browser.new_page()
    page.goto(served["url"] + "/")
    page.fill("#key", served["env"]["analyze_key"])
    page.set_input_files("#file", str(path))
    page.select_option("#modality", "SEM")
    page.click("#analyze")
    page.wait_for_selector("#status:has-text('done')", timeout=120_000)
    shapes = page.evaluate("""() => ['image', 'masks', 'boxes'].map(id => {
        const c = document.getElementById(id), r = c.getBoundingClientRect();
        return [c.width, c.height, r.left, r.top, r.width, r.height];
    })""")
    (w, h, *image_box), masks, boxes = shapes
    assert (w, h) == (256, 128)  # drawn at the image's own pixels
    left, top, shown_w, shown_h = image_box
    assert abs(shown_h - shown_w) <= 1, image_box  # shown square, as the sample is
    assert masks[2:] == image_box and boxes[2:] == image_box  # overlays exactly over it
    page.close()
