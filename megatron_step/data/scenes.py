"""Generated image-text scenes with ground truth: the built-in source of MMRPT's webdataset shards.

    import random
    from megatron_step.data.scenes import encode_jpeg, generate_scene, scene_rng
    image, caption, truth = generate_scene(scene_rng(seed=0, index=42), size=64)
    caption        # "The picture was made by a program. There are two red circles. A large blue square ..."
    truth["objects"][0]     # {"shape": "circle", "colour": "red", "size": "small", "x": 12, "y": 30, ...}
    truth["sentences"][1]   # {"text": "There are two red circles.", "start": 35, "end": 61,
                            #  "visual": True, "attributes": {"count": 2, "colour": "red", "shape": "circle"},
                            #  "objects": [0, 2]}
    jpeg = encode_jpeg(image, quality=90)

Why generated: every machine can make them (no download), and each caption sentence comes labelled as
*visual* (true only of this image: "There are two red circles.") or *generic* (true of any image: "This
is a simple drawing."). Masked multimodal pretraining can then be scored per sentence and per attribute
(shape, colour, size, position, count) against the truth instead of by string match.

Layout: the image is split into a 3x3 grid of thirds; an object's position word comes from the cell of
its centre: left / right / top / bottom (the four edge-middle cells) or center. Corner cells are never
used, so every object has exactly one unambiguous word. Objects never overlap (their bounding boxes are
kept apart by at least one pixel), so the pixel at an object's centre is the object's own colour.

Determinism: everything is drawn from the `random.Random` passed in; `scene_rng(seed, index)` seeds one
per sample from a string (Python hashes str seeds with sha512, stable across processes and platforms),
so sample i is the same whatever the shard size or the number of samples.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND",
    "GENERIC_SENTENCES",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "encode_jpeg",
    "generate_scene",
    "position_of",
    "scene_rng",
]

# Saturated, far apart in RGB, so the nearest palette entry of a JPEG-decoded pixel is still the right one.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 50, 190),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
}
BACKGROUND: tuple[int, int, int] = (
    20,
    20,
    20,
)  # near-black: every palette colour, white included, stands out
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.08, "large": 0.16}  # half-extent as a fraction of the image side
# position word -> (column, row) of its grid cell; phrase used in captions
POSITIONS: dict[str, tuple[int, int]] = {
    "left": (0, 1),
    "right": (2, 1),
    "top": (1, 0),
    "bottom": (1, 2),
    "center": (1, 1),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

# True of any picture this generator makes: the sentences an image cannot help predict.
GENERIC_SENTENCES = (
    "This is a simple drawing.",
    "The picture was made by a program.",
    "Shapes are common in geometry.",
    "Simple pictures are easy to describe.",
    "Computers can draw many kinds of pictures.",
    "Geometry is a branch of mathematics.",
    "Colours can be mixed to make new colours.",
    "Every shape has a name.",
    "Drawings like this are used to test models.",
    "A picture can show many things.",
)

_PLACE_TRIES = 50  # rejection-sampling tries per object; an object that finds no free spot is dropped


def scene_rng(seed: int, index: int) -> random.Random:
    """The generator for sample `index` under `seed`: independent of how many samples come before it."""
    return random.Random(f"scene:{seed}:{index}")


def position_of(x: int, y: int, size: int) -> str | None:
    """The position word of a centre (x, y) in a size x size image; None in a corner cell."""
    cell = (min(2, 3 * x // size), min(2, 3 * y // size))
    for word, c in POSITIONS.items():
        if c == cell:
            return word
    return None


def _radius(size_word: str, size: int) -> int:
    return max(2, round(SIZES[size_word] * size))


def _cell_range(c: int, size: int, r: int) -> tuple[int, int]:
    """Integer coordinates whose third is c (3 * v // size == c) and that keep a half-extent r inside."""
    lo, hi = -(-c * size // 3), -(-(c + 1) * size // 3) - 1
    return max(lo, r), min(hi, size - 1 - r)


def _place(rng: random.Random, n: int, size: int) -> list[dict]:
    objects: list[dict] = []
    for _ in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(PALETTE))
        size_word = rng.choice(list(SIZES))
        r = _radius(size_word, size)
        for _ in range(_PLACE_TRIES):
            word = rng.choice(list(POSITIONS))
            (xlo, xhi), (ylo, yhi) = (_cell_range(c, size, r) for c in POSITIONS[word])
            if xlo > xhi or ylo > yhi:
                continue
            x, y = rng.randint(xlo, xhi), rng.randint(ylo, yhi)
            # bounding boxes [x-r, x+r] apart by >= 1 px on some axis: no overlap, not even touching
            if all(abs(x - o["x"]) > r + o["r"] + 1 or abs(y - o["y"]) > r + o["r"] + 1 for o in objects):
                objects.append(
                    {
                        "shape": shape,
                        "colour": colour,
                        "size": size_word,
                        "x": x,
                        "y": y,
                        "r": r,
                        "position": word,
                    }
                )
                break
    return objects


def _draw(objects: list[dict], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in objects:
        x, y, r, fill = o["x"], o["y"], o["r"], PALETTE[o["colour"]]
        if o["shape"] == "circle":
            d.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o["shape"] == "square":
            d.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:  # apex up, base at the bottom of the box; (x, y) lies inside
            d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return img


def _sentence(text: str, attributes: dict, objects: list[int]) -> dict:
    return {"text": text, "visual": True, "attributes": attributes, "objects": objects}


def _visual_sentences(rng: random.Random, objects: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(objects):
        groups.setdefault((o["colour"], o["shape"]), []).append(i)
    out = []
    for i, o in enumerate(objects):  # one sentence per object
        colour, shape, size_word, pos = o["colour"], o["shape"], o["size"], o["position"]
        unique = len(groups[(colour, shape)]) == 1  # "The red circle" only when there is just one
        form = rng.choice(("size_position", "position", "size")) if unique else "size_position"
        if form == "size_position":
            text = f"A {size_word} {colour} {shape} is {POSITION_PHRASES[pos]}."
            attrs = {"size": size_word, "colour": colour, "shape": shape, "position": pos}
        elif form == "position":
            text = f"The {colour} {shape} is {POSITION_PHRASES[pos]}."
            attrs = {"colour": colour, "shape": shape, "position": pos}
        else:
            text = f"The {colour} {shape} is {size_word}."
            attrs = {"colour": colour, "shape": shape, "size": size_word}
        out.append(_sentence(text, attrs, [i]))
    for (colour, shape), idx in groups.items():
        if len(idx) > 1:
            text = f"There are {NUMBER_WORDS[len(idx)]} {colour} {shape}s."
            out.append(_sentence(text, {"count": len(idx), "colour": colour, "shape": shape}, idx))
    if rng.random() < 0.5:
        n = len(objects)
        text = "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."
        out.append(_sentence(text, {"count": n}, list(range(n))))
    return out


def generate_scene(
    rng: random.Random, size: int = 64, min_objects: int = 1, max_objects: int = 4
) -> tuple[Image.Image, str, dict]:
    """One scene: (RGB image, caption, ground truth), all drawn from `rng`.

    truth = {
      "size": [W, H],
      "objects": [{"shape", "colour", "size", "x", "y", "r", "position"}],  # x, y: centre; r: half-extent
      "sentences": [{"text", "start", "end", "visual", "attributes", "objects"}],
    }
    caption[start:end] == text. A visual sentence's `attributes` are what it states (some of shape,
    colour, size, position, count) and `objects` the indices it is about; generic sentences have
    visual=False and both empty. Fewer than `min_objects` objects are possible only when a crowded
    image has no free spot left (never at the default size and counts).
    """
    if not 1 <= min_objects <= max_objects <= max(NUMBER_WORDS):
        raise ValueError(
            f"need 1 <= min_objects({min_objects}) <= max_objects({max_objects}) <= {max(NUMBER_WORDS)}"
        )
    if size < 32:
        raise ValueError(f"size({size}) must be >= 32 (a small shape would be under 3 px)")
    objects = _place(rng, rng.randint(min_objects, max_objects), size)
    image = _draw(objects, size)
    sentences = _visual_sentences(rng, objects)
    for text in rng.sample(GENERIC_SENTENCES, rng.randint(1, 2)):
        sentences.append({"text": text, "visual": False, "attributes": {}, "objects": []})
    rng.shuffle(sentences)
    start, parts = 0, []
    for s in sentences:
        s["start"], s["end"] = start, start + len(s["text"])
        parts.append(s["text"])
        start = s["end"] + 1  # one space between sentences
    truth = {"size": [size, size], "objects": objects, "sentences": sentences}
    return image, " ".join(parts), truth


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """Baseline JPEG bytes of an RGB image, deterministic for a given Pillow/libjpeg build.

    4:4:4 chroma (subsampling=0): at 64 px a small shape is ~10 px across, and 4:2:0 would average its
    colour with the background over 2x2 blocks along its edges.
    """
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()
