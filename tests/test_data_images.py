"""data.ImageCaptionDataset (stage 4): Infinity-MM-like jsonl rows and parquet rows with image bytes, decoded by
vision.preprocess_images in DataLoader workers; broken images skipped and counted, or a clear error."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import vision
from data import DataError, ImageCaptionDataset

skdata = pytest.importorskip("skimage.data")  # real photographs (requirements-test.txt)


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


PHOTOS = {"astronaut": "An astronaut in a spacesuit poses in front of the American flag.",
          "chelsea": "A tabby cat looks to the side.",
          "coffee": "A cup of coffee on a saucer.",
          "rocket": "A rocket on its launch pad.",
          "camera": "A man with a camera on a tripod, in black and white."}


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    (d / "images").mkdir()
    for name in PHOTOS:
        (d / "images" / f"{name}.jpg").write_bytes(_jpeg(getattr(skdata, name)()))
    good = _jpeg(skdata.astronaut())
    (d / "images" / "truncated.jpg").write_bytes(good[: len(good) // 3])  # broken: truncated
    (d / "images" / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG\n")  # broken: not an image
    return d


def _infinity_mm_row(i, image, caption):
    return {"id": str(i), "image": image, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": caption}]}


def test_jsonl_infinity_mm_layout_with_broken_images(images_dir, tmp_path):
    rows = [_infinity_mm_row(i, f"images/{n}.jpg", c) for i, (n, c) in enumerate(PHOTOS.items())]
    rows.insert(2, _infinity_mm_row(90, "images/truncated.jpg", "broken"))
    rows.insert(4, _infinity_mm_row(91, "images/not_an_image.jpg", "broken"))
    rows.insert(5, _infinity_mm_row(92, "images/missing.jpg", "missing file"))
    p = images_dir / "captions.jsonl"
    with open(p, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write('{"image": "images/coffee.jpg", "conversations": [}\n')  # malformed line: skipped at index time
    ds = ImageCaptionDataset(p, image_size=64)
    assert len(ds) == 8 and ds.skips == {"malformed_json": 1}
    batches = list(ds.loader(batch_size=4, shuffle=False, num_workers=2, drop_last=False))  # decoded in workers
    assert ds.skips["broken_image"] == 3
    caps = [c for b in batches for c in b["captions"]]
    assert caps == list(PHOTOS.values())
    pv = torch.cat([b["pixel_values"] for b in batches])
    assert pv.shape == (5, 3, 64, 64) and pv.dtype == torch.float32
    ref, _, _ = vision.preprocess_images([images_dir / "images" / "chelsea.jpg"], size=64)
    assert torch.equal(pv[1], ref[0])  # same pixels as model.py's own preprocessing
    with pytest.raises(DataError, match=r"captions.jsonl:9: malformed json"):
        ImageCaptionDataset(p, image_size=64, on_error="raise")


def test_broken_image_raise_names_row_and_file(images_dir, tmp_path):
    p = tmp_path / "c.jsonl"
    img = str(images_dir / "images" / "truncated.jpg")
    p.write_text(json.dumps({"image": str(images_dir / "images" / "coffee.jpg"), "caption": "coffee"}) + "\n"
                 + json.dumps({"image": img, "caption": "broken"}) + "\n")
    ds = ImageCaptionDataset(p, image_size=32, on_error="raise")
    with pytest.raises(vision.ImageError, match=r"c.jsonl row 1 \(image .*truncated.jpg\)"):
        ds.collate([ds[0], ds[1]])


def test_parquet_bytes_and_hf_image_struct(images_dir, tmp_path):
    names = list(PHOTOS)
    imgs = [_png(getattr(skdata, n)()) for n in names[:3]] + [b"\x89PNG broken"]
    p = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in imgs],
                             "caption": [PHOTOS[n] for n in names[:3]] + ["broken"]}), p, row_group_size=2)
    ds = ImageCaptionDataset(p, image_size=48)
    assert len(ds) == 4
    b = ds.collate([ds[i] for i in range(4)])
    assert b["captions"] == [PHOTOS[n] for n in names[:3]] and b["n_skipped"] == 1
    assert b["indices"].tolist() == [0, 1, 2] and b["pixel_values"].shape == (3, 3, 48, 48)
