"""Synthetic picture world for the vision stages: rendered scenes with captions and Q&A, zh + en.

A scene is one of five kinds, each testing one visual skill with short, exact-match answers:
- `single`: one shape -> colour, shape, size (small/large), position (left/right/top/bottom/center);
- `pair`:   two shapes side by side or stacked -> attribute binding ("what colour is the star?");
- `count`:  1-5 copies of one coloured shape -> counting;
- `text`:   a short word or digit -> reading;
- `chart`:  a bar chart of 2-4 coloured bars -> tallest / shortest / how many bars.

Held-out generalisation: the colour+shape pairs in `HELD_OUT_PAIRS` never appear in any training
image (every colour and every shape still does, with other partners); evaluation scenes use them
often and are flagged `"unseen_combo": true`.

`write_scene_splits(out_dir, seed, scale)` writes, in minimind-v's formats (image paths are relative
to `out_dir/images`, like minimind-v's `--images_path`):
- `clip_pretrain.jsonl`  `{"image", "caption", "lang"[, "regions"]}` (one line per image and language;
                         the train images plus the caption-only `clip` images); scenes of shapes
                         add `regions`: `[{"box": [x0, y0, x1, y1], "caption"}]`, one per shape
- `vlm_pretrain.jsonl`   `{"conversations": [user "<image>\\nDescribe...", assistant caption], "image"}`
- `vlm_sft.jsonl`        `{"conversations": [user "<image>\\nquestion", assistant answer], "image", "type", "lang"}`
                         (the train images' questions, then those of the question-only `sft`, `pairs`
                         and `charts` images)
- `eval/vqa.jsonl`       the same plus `"answer"`, `"lang"`, `"type"`, `"unseen_combo"`
- `eval/captions.jsonl`  `{"image", "caption", "caption_zh", "kind", "unseen_combo"}` (retrieval eval)
- `scenes.json`          counts, scale, seed, held-out pairs
Same seed and scale -> byte-identical files.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from data.scenes_render import render

COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 40, 40), "红色"),
    "green": ((40, 165, 60), "绿色"),
    "blue": ((40, 90, 225), "蓝色"),
    "yellow": ((235, 200, 25), "黄色"),
    "purple": ((140, 60, 190), "紫色"),
    "orange": ((245, 135, 30), "橙色"),
}
SHAPES: dict[str, tuple[str, str]] = {  # name -> (English plural, Chinese)
    "circle": ("circles", "圆形"),
    "square": ("squares", "正方形"),
    "triangle": ("triangles", "三角形"),
    "diamond": ("diamonds", "菱形"),
    "star": ("stars", "星形"),
}
SIZES = {"small": ("小", 0.11), "large": ("大", 0.2)}  # name -> (Chinese, radius as a fraction of the image)
POSITIONS = {  # name -> (English phrase, Chinese, centre)
    "left": ("on the left", "左边", (0.26, 0.5)),
    "right": ("on the right", "右边", (0.74, 0.5)),
    "top": ("at the top", "上方", (0.5, 0.26)),
    "bottom": ("at the bottom", "下方", (0.5, 0.74)),
    "center": ("in the center", "中间", (0.5, 0.5)),
}
WORDS = ["cat", "dog", "sun", "car", "box", "hat", "cup", "map", "pen", "bus", "key", "egg"] + list("0123456789")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]
# Diagonal of the colour x shape table: each shape and each colour is held out at most once.
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "star"), ("blue", "circle"),
                            ("yellow", "square"), ("purple", "diamond")})

# Images per split and pixel size; the SFT set asks several questions per image. `clip` images are
# extra training scenes with captions only, for the CLIP stage: a ViT from scratch needs many distinct
# pictures to learn shapes (tiny ViT, supervised shape on single scenes, 300 steps of 64: 0.78
# held-out with a fresh scene every sample vs 0.63 after 400 steps over 900 fixed scenes).
# `sft` images are extra training scenes with questions only, for VLM SFT: the VLM too learns more
# from more distinct pictures than from the same ones asked again. tiny with 36000 training images
# instead of 9000 (same LM, CLIP and 3000 SFT steps, seed 42, all 600 held-out questions, 2026-12-05):
# VQA 0.667 vs 0.632, unseen pairs 0.683 vs 0.656; 72000: 0.662 / 0.660. They come from their own
# random stream and their rows follow the train rows in `vlm_sft.jsonl`, so every other file and the
# head of that one (what the tokenizer reads) stay as they were: the LM does not change with them.
# `pairs` adds two-object scenes for VLM SFT, each asked about both objects, their rows last, and
# `keyed` answers a question about one of several objects key first ("circle red"). Together (either
# one alone left the two-object questions at 0.40) they taught the VLM to look up the object a
# question names: on the tiny seed-42 VLM, VLM SFT with keyed answers and 8000 pair scenes (7000 steps
# instead of 4500) lifted held-out two-object questions from 0.39 to 0.625 and VQA from 0.788 to 0.847
# (16000: 0.617 and 0.812, count falling to 0.78; docs/experiments.md). Keyed answers change the head
# of `vlm_sft.jsonl`, which the tokenizer reads, so they change the LM too: the pipeline from scratch
# with both gave VQA 0.818, two-object questions 0.57 (seed 42, runs/keyed42).
# `charts` adds bar charts for VLM SFT asked for the tallest and the shortest bar, their rows last:
# the VLM named the shortest bar in 11 of 32 held-out questions with the charts of the mixed splits
# (an earlier VLM: 0.19 of its own training charts), 26-29 of 32 with 6000 more; VQA over VLM SFT seeds 42 / 1 / 2
# 0.818 / 0.807 / 0.823 -> 0.848 / 0.818 / 0.858, two-object questions 3-9 of 120 lower (docs/experiments.md).
SCALES = {
    "micro": dict(train=48, eval=30, size=64, clip=24, keyed=True, pairs=8, charts=8),
    "tiny": dict(train=9000, eval=300, size=64, clip=20000, sft=27000, keyed=True, pairs=8000, charts=6000),
    # pairs and charts: tiny's, unmeasured here
    "small": dict(train=20000, eval=1000, size=96, clip=60000, keyed=True, pairs=8000, charts=6000),
}
KIND_WEIGHTS = {"single": 3, "pair": 2, "count": 2, "text": 1.5, "chart": 1.5}
# The VLM's training images: a single or pair scene brings 6-8 questions, a count or text scene 2, so
# at KIND_WEIGHTS counting and reading got 1200 and 900 of 15900 SFT rows, and they are the weakest
# types. A ridge probe of our CLIP's patch tokens reads the word at 0.52 / 0.79 / 0.89 when fitted on
# 450 / 1500 / 3000 text scenes (tiny had 450): reading needs many more pictures of words.
TRAIN_KIND_WEIGHTS = {"single": 3, "pair": 2, "count": 4, "text": 6, "chart": 1.5}
EVAL_UNSEEN_RATE = 0.5  # share of eval object scenes that contain a held-out pair

DESCRIBE = {
    "en": ["Describe the image.", "What is in this picture?", "Give a short caption for the image."],
    "zh": ["描述这张图片。", "图片里有什么？", "用一句话描述这张图片。"],
}


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    position: str  # one of POSITIONS, or "" for scattered (count) objects
    x: float
    y: float
    r: float

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour][0]


@dataclass
class Scene:
    kind: str
    objects: list[Obj] = field(default_factory=list)
    text: str = ""
    text_xy: tuple[float, float] = (0.5, 0.5)
    text_size: float = 0.4
    text_rgb: tuple[int, int, int] = (20, 20, 20)
    bars: list[tuple[tuple[int, int, int], float]] = field(default_factory=list)
    bar_colours: list[str] = field(default_factory=list)

    @property
    def unseen_combo(self) -> bool:
        return any((o.colour, o.shape) in HELD_OUT_PAIRS for o in self.objects)


# -- sampling -------------------------------------------------------------------------------------
def _pick_pair(rng: random.Random, split: str, force_unseen: bool) -> tuple[str, str]:
    if force_unseen:
        return rng.choice(sorted(HELD_OUT_PAIRS))
    while True:
        pair = (rng.choice(list(COLOURS)), rng.choice(list(SHAPES)))
        if split == "eval" or pair not in HELD_OUT_PAIRS:
            return pair


def _jitter(rng: random.Random, amount: float = 0.04) -> float:
    return rng.uniform(-amount, amount)


def sample_scene(rng: random.Random, split: str, kind: str, force_unseen: bool = False) -> Scene:
    """A random scene of `kind`; training scenes never contain a held-out colour+shape pair."""
    if kind == "single":
        colour, shape = _pick_pair(rng, split, force_unseen)
        size, pos = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
        (cx, cy), r = POSITIONS[pos][2], SIZES[size][1] * rng.uniform(0.9, 1.1)
        return Scene(kind, [Obj(shape, colour, size, pos, cx + _jitter(rng), cy + _jitter(rng), r)])
    if kind == "pair":
        first = _pick_pair(rng, split, force_unseen)
        while True:
            second = _pick_pair(rng, split, False)
            if second[0] != first[0] and second[1] != first[1]:
                break
        slots = rng.choice([("left", "right"), ("top", "bottom")])
        if rng.random() < 0.5:
            slots = slots[::-1]
        objs = []
        for (colour, shape), pos in zip((first, second), slots):
            cx, cy = POSITIONS[pos][2]
            objs.append(Obj(shape, colour, "", pos, cx + _jitter(rng, 0.03), cy + _jitter(rng, 0.03),
                            0.15 * rng.uniform(0.9, 1.1)))
        return Scene(kind, objs)
    if kind == "count":
        colour, shape = _pick_pair(rng, split, force_unseen)
        n, r = rng.randint(1, 5), 0.085
        centres: list[tuple[float, float]] = []
        while len(centres) < n:  # rejection sampling: separated, inside the frame
            c = (rng.uniform(r + 0.04, 1 - r - 0.04), rng.uniform(r + 0.04, 1 - r - 0.04))
            if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > (2.6 * r) ** 2 for a, b in centres):
                centres.append(c)
        return Scene(kind, [Obj(shape, colour, "", "", x, y, r) for x, y in centres])
    if kind == "text":
        word = rng.choice(WORDS)
        rgb = COLOURS[rng.choice(list(COLOURS))][0] if rng.random() < 0.3 else (20, 20, 20)
        return Scene(kind, text=word, text_xy=(0.5 + _jitter(rng, 0.06), 0.5 + _jitter(rng, 0.15)),
                     text_size=(0.42 if len(word) > 1 else 0.55) * rng.uniform(0.9, 1.05), text_rgb=rgb)
    if kind == "chart":
        n = rng.randint(2, 4)
        colours = rng.sample(list(COLOURS), n)
        while True:  # distinct heights, so tallest and shortest are unambiguous
            heights = [rng.uniform(0.15, 1.0) for _ in range(n)]
            ordered = sorted(heights)
            if all(b - a > 0.12 for a, b in zip(ordered, ordered[1:])):
                break
        return Scene(kind, bars=[(COLOURS[c][0], h) for c, h in zip(colours, heights)], bar_colours=colours)
    raise ValueError(f"unknown scene kind {kind!r}")


# -- language ---------------------------------------------------------------------------------------
def caption(scene: Scene, lang: str) -> str:
    """One canonical description of the scene (the CLIP / VLM-pretrain target)."""
    zh = lang == "zh"
    if scene.kind == "single":
        o = scene.objects[0]
        if zh:
            return f"{POSITIONS[o.position][1]}有一个{SIZES[o.size][0]}的{COLOURS[o.colour][1]}{SHAPES[o.shape][1]}"
        return f"a {o.size} {o.colour} {o.shape} {POSITIONS[o.position][0]}"
    if scene.kind == "pair":
        if zh:
            return "，".join(f"{POSITIONS[o.position][1]}是{COLOURS[o.colour][1]}{SHAPES[o.shape][1]}"
                            for o in scene.objects)
        return " and ".join(f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape} "
                            f"{POSITIONS[o.position][0]}" for o in scene.objects)
    if scene.kind == "count":
        o, n = scene.objects[0], len(scene.objects)
        if zh:
            return f"{n}个{COLOURS[o.colour][1]}{SHAPES[o.shape][1]}"
        return f"{NUMBER_WORDS[n]} {o.colour} {o.shape if n == 1 else SHAPES[o.shape][0]}"
    if scene.kind == "text":
        is_digit = scene.text.isdigit()
        if zh:
            return f"图片上写着{'数字' if is_digit else '单词'}“{scene.text}”"
        return f"the {'number' if is_digit else 'word'} \"{scene.text}\""
    if scene.kind == "chart":
        tallest = tallest_bar(scene)
        if zh:
            return f"有{len(scene.bars)}根柱子的柱状图，{COLOURS[tallest][1]}柱子最高"
        return f"a bar chart with {len(scene.bars)} bars, the {tallest} bar is the tallest"
    raise ValueError(scene.kind)


def regions(scene: Scene, lang: str) -> list[dict]:
    """Each object's box (fractions of the image: x0, y0, x1, y1) and its own short caption ("an
    orange star" / "橙色星形"): region-caption pairs as in RegionCLIP, for a CLIP loss that makes the
    patch tokens at an object describe that object rather than the whole picture."""
    out = []
    for o in scene.objects:
        text = f"{COLOURS[o.colour][1]}{SHAPES[o.shape][1]}" if lang == "zh" else \
            _fix_articles(f"a {o.colour} {o.shape}")
        box = [round(min(max(v, 0.0), 1.0), 4) for v in (o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r)]
        out.append({"box": box, "caption": text})
    return out


def tallest_bar(scene: Scene) -> str:
    return max(zip(scene.bar_colours, scene.bars), key=lambda cb: cb[1][1])[0]


def shortest_bar(scene: Scene) -> str:
    return min(zip(scene.bar_colours, scene.bars), key=lambda cb: cb[1][1])[0]


def questions(scene: Scene, rng: random.Random, lang: str, about: Obj | None = None,
              keyed: bool = False) -> list[tuple[str, str, str]]:
    """Every (type, question, answer) the scene supports, in `lang`; answers are one short word, or
    with `keyed` the key word(s) and then that word.

    `keyed=True`: a question that picks one object by its shape, place, or colour and shape is
    answered with that key first ("What colour is the circle?" -> "circle red", "圆形红色"), so the
    answer is predicted where the asked word sits (docs/experiments.md, "Keyed answers").
    `about` picks the object of a pair scene that is asked about (default: a held-out one, else random)."""
    zh = lang == "zh"
    cn = lambda c: COLOURS[c][1] if zh else c  # noqa: E731 - answer words per language
    sn = lambda s: SHAPES[s][1] if zh else s  # noqa: E731
    pn = lambda p: POSITIONS[p][1] if zh else p  # noqa: E731
    key = lambda subject, answer: (subject + answer if zh else f"{subject} {answer}") if keyed else answer  # noqa: E731
    qs: list[tuple[str, str, str]] = []
    if scene.kind == "single":
        o = scene.objects[0]
        qs += [
            ("colour", rng.choice(["这个图形是什么颜色？", f"图中的{sn(o.shape)}是什么颜色？"]) if zh else
             rng.choice(["What colour is the shape?", f"What is the colour of the {o.shape}?"]), cn(o.colour)),
            ("shape", "图中是什么形状？" if zh else rng.choice(["What shape is shown?", "What shape is in the image?"]),
             sn(o.shape)),
            ("size", f"这个{sn(o.shape)}是大还是小？" if zh else f"Is the {o.shape} small or large?",
             SIZES[o.size][0] if zh else o.size),
            # the same question as a pair scene's, so the same keyed answer
            ("position", f"{cn(o.colour)}的{sn(o.shape)}在哪里？" if zh else f"Where is the {o.colour} {o.shape}?",
             key(sn(o.shape) if zh else f"{o.colour} {o.shape}", pn(o.position))),
        ]
    elif scene.kind == "pair":
        # Ask about the held-out object when there is one: that is what `unseen_combo` measures.
        unseen = [o for o in scene.objects if (o.colour, o.shape) in HELD_OUT_PAIRS]
        o = about or (unseen[0] if unseen else rng.choice(scene.objects))
        qs += [
            ("colour", f"{sn(o.shape)}是什么颜色？" if zh else f"What colour is the {o.shape}?",
             key(sn(o.shape), cn(o.colour))),
            ("shape", f"{pn(o.position)}是什么形状？" if zh else f"What shape is {POSITIONS[o.position][0]}?",
             key(pn(o.position), sn(o.shape))),
            ("position", f"{cn(o.colour)}的{sn(o.shape)}在哪里？" if zh else f"Where is the {o.colour} {o.shape}?",
             key(sn(o.shape) if zh else f"{o.colour} {o.shape}", pn(o.position))),
        ]
    elif scene.kind == "count":
        o = scene.objects[0]
        qs.append(("count", f"图中有几个{sn(o.shape)}？" if zh else f"How many {SHAPES[o.shape][0]} are there?",
                   str(len(scene.objects))))
    elif scene.kind == "text":
        qs.append(("text", "图片上写的是什么？" if zh else "What is written in the image?", scene.text))
    elif scene.kind == "chart":
        qs += [*chart_superlatives(scene, lang),
               ("chart", "图中有几根柱子？" if zh else "How many bars are in the chart?", str(len(scene.bars)))]
    return qs


def chart_superlatives(scene: Scene, lang: str) -> list[tuple[str, str, str]]:
    """The chart's "which bar is the tallest / shortest?" questions, (type, question, answer)."""
    zh = lang == "zh"
    cn = lambda c: COLOURS[c][1] if zh else c  # noqa: E731
    return [("chart", "哪根柱子最高？" if zh else "Which bar is the tallest?", cn(tallest_bar(scene))),
            ("chart", "哪根柱子最矮？" if zh else "Which bar is the shortest?", cn(shortest_bar(scene)))]


def _swap_groups() -> list[list[str]]:
    """Interchangeable caption fragments: swapping one for another changes exactly one attribute."""
    words = [w for w in WORDS if not w.isdigit()], [w for w in WORDS if w.isdigit()]
    return [list(COLOURS), [v[1] for v in COLOURS.values()],
            list(SHAPES), [v[1] for v in SHAPES.values()],
            list(SIZES), [f"{v[0]}的" for v in SIZES.values()],
            [v[0] for v in POSITIONS.values()], [v[1] for v in POSITIONS.values()],
            [f"{w} " for w in NUMBER_WORDS[2:]], [f"{n}个" for n in range(1, 6)],  # "one" takes a singular
            [f"{n} bars" for n in range(2, 5)], [f"有{n}根" for n in range(2, 5)],
            *([f'"{w}"' for w in group] for group in words), *([f"“{w}”" for w in group] for group in words)]


SWAP_GROUPS = _swap_groups()
_HELD_OUT_TEXT = [f"{c} {s}" for c, s in HELD_OUT_PAIRS] + [f"{COLOURS[c][1]}{SHAPES[s][1]}" for c, s in HELD_OUT_PAIRS]


def hard_negative(text: str, rng: random.Random, tries: int = 8, swap_share: float = 0.0) -> str | None:
    """`text` with one attribute changed (colour, shape, size, position, count, bars or word), or None.

    A contrastive negative that differs from the true caption in a single fragment forces the encoder
    to see *every* attribute, not just the easiest one (colour) that already separates most in-batch
    pairs. With probability `swap_share`, a caption of two objects gets `swapped_binding` instead:
    the same words, bound to the other object. Negatives never name a held-out colour+shape pair:
    those stay unseen in training text too.
    """
    if swap_share and rng.random() < swap_share and (swapped := swapped_binding(text, rng)) is not None:
        return swapped
    spots = [(i, frag, group) for group in SWAP_GROUPS for frag in group for i in _find_all(text, frag)]
    for _ in range(tries if spots else 0):
        i, frag, group = rng.choice(spots)
        # a fragment already in the caption would make a tell-tale negative ("a green ... a green ...")
        others = [g for g in group if g not in text]
        if not others:
            continue
        new = _fix_articles(text[:i] + rng.choice(others) + text[i + len(frag):])
        if new != text and not any(h in new for h in _HELD_OUT_TEXT):
            return new
    return None


def swapped_binding(text: str, rng: random.Random) -> str | None:
    """A two-object caption with one attribute exchanged between the objects ("a red star on the left
    and a green diamond on the right" -> "a green star on the left and a red diamond on the right"),
    or None when there is no such pair. Only which object holds what tells the two apart, which is
    what questions about one object of a pair ask ("what colour is the star?")."""
    swaps = []
    for group in SWAP_GROUPS:
        present = [(i, frag) for frag in group for i in _find_all(text, frag)]
        if len(present) == 2 and present[0][1] != present[1][1]:
            swaps.append(sorted(present))
    rng.shuffle(swaps)
    for (i, a), (j, b) in swaps:
        new = _fix_articles(text[:i] + b + text[i + len(a):j] + a + text[j + len(b):])
        if new != text and not any(h in new for h in _HELD_OUT_TEXT):
            return new
    return None


def _fix_articles(text: str) -> str:
    return re.sub(r"\b(an?) (\w)", lambda m: ("an " if m[2] in "aeiou" else "a ") + m[2], text)


def colourless_caption(text: str) -> str | None:
    """The caption of the same scene drawn in grey (colour words dropped), or None for bar charts,
    whose captions need the colours. Grey copies teach an encoder shapes that do not depend on the
    colour they came in, which is what held-out colour+shape pairs ask for."""
    if "bar chart" in text or "柱状图" in text:
        return None
    text = re.sub(rf"\b({'|'.join(COLOURS)}) ", "", text)
    return _fix_articles(re.sub("|".join(v[1] for v in COLOURS.values()), "", text))


def _find_all(text: str, fragment: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(fragment), text)]


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}]


# -- writing ------------------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _kinds(n: int, rng: random.Random, weights: dict[str, float] = KIND_WEIGHTS) -> list[str]:
    """`n` scene kinds in proportion to `weights` (exact shares, shuffled)."""
    total = sum(weights.values())
    kinds = [k for k, w in weights.items() for _ in range(round(n * w / total))]
    kinds = (kinds + list(weights) * n)[:n]
    rng.shuffle(kinds)
    return kinds


def write_scene_splits(out_dir: str | Path, seed: int = 0, scale: str = "tiny", images: bool = True,
                       keyed: bool | None = None, pair_images: int | None = None,
                       chart_images: int | None = None) -> dict:
    """Render the train and eval scenes of `scale` into `out_dir`; returns the summary (also scenes.json).

    `images=False` writes only the text (captions, questions; identical either way, as the scenes
    come from seeded generators and `render` is deterministic): the tokenizer and the LM stages need
    the words, and rendering is most of the synthetic world's cost (tiny: 29 of 32 s). A second
    call with `images=True` adds the pictures, which only the vision stages read.
    `keyed`, `pair_images` and `chart_images` default to the scale's `keyed`, `pairs` and `charts`."""
    if scale not in SCALES:
        raise ValueError(f"unknown scene scale {scale!r}; choose one of {sorted(SCALES)}")
    spec, out = SCALES[scale], Path(out_dir)
    keyed = spec.get("keyed", False) if keyed is None else keyed
    pair_images = spec.get("pairs", 0) if pair_images is None else pair_images
    chart_images = spec.get("charts", 0) if chart_images is None else chart_images
    clip_rows, pre_rows, sft_rows, vqa_rows, cap_rows, more_rows = [], [], [], [], [], []
    to_render: list[tuple[Scene, Path]] = []  # drawn after the text, on every core (render is deterministic)
    for split in ("train", "eval", "clip", "sft"):
        rng = random.Random(f"scenes-{seed}-{split}")  # str seeds are hashed stably across runs
        if images and spec.get(split, 0):
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
        weights = TRAIN_KIND_WEIGHTS if split in ("train", "sft") else KIND_WEIGHTS
        for i, kind in enumerate(_kinds(spec.get(split, 0), rng, weights)):
            force = split == "eval" and kind in ("single", "pair", "count") and rng.random() < EVAL_UNSEEN_RATE
            scene = sample_scene(rng, "eval" if split == "eval" else "train", kind, force_unseen=force)
            image = f"{split}/{i:06d}.png"
            if images:
                to_render.append((scene, out / "images" / image))
            en, zh = caption(scene, "en"), caption(scene, "zh")
            if split in ("train", "clip"):
                for lang, text in (("en", en), ("zh", zh)):
                    clip_rows.append({"image": image, "caption": text, "lang": lang}
                                     | ({"regions": regions(scene, lang)} if scene.objects else {}))
            if split == "train":
                for lang, text in (("en", en), ("zh", zh)):
                    pre_rows.append({"conversations": _chat(rng.choice(DESCRIBE[lang]), text), "image": image})
            if split in ("train", "sft"):
                rows = sft_rows if split == "train" else more_rows
                for lang in ("en", "zh"):  # every question in both languages: answers align across them
                    for qtype, q, a in questions(scene, rng, lang, keyed=keyed):
                        rows.append({"conversations": _chat(q, a), "image": image, "type": qtype, "lang": lang})
                if rng.random() < 0.1:
                    lang = rng.choice(["en", "zh"])
                    rows.append({"conversations": _chat(rng.choice(DESCRIBE[lang]), en if lang == "en" else zh),
                                 "image": image, "type": "caption", "lang": lang})
            elif split == "eval":
                cap_rows.append({"image": image, "caption": en, "caption_zh": zh, "kind": kind,
                                 "unseen_combo": scene.unseen_combo})
                # Two questions per eval image, one per language, of different types where possible
                # (`questions` lists the same types in the same order for both languages).
                by_lang = {lang: questions(scene, rng, lang, keyed=keyed) for lang in ("en", "zh")}
                picks = rng.sample(range(len(by_lang["en"])), k=min(2, len(by_lang["en"])))
                for lang, pick in (("en", picks[0]), ("zh", picks[-1])):
                    qtype, q, a = by_lang[lang][pick]
                    vqa_rows.append({"conversations": _chat(q, a), "image": image, "answer": a, "lang": lang,
                                     "type": qtype, "unseen_combo": scene.unseen_combo, "kind": kind})
    # Extra SFT scenes, each kind from its own stream: pair scenes with every object asked about, bar
    # charts asked for the tallest and the shortest bar.
    pair_rows = _extra_scenes("pair", pair_images, seed, out, images, to_render, lambda scene, rng: [
        (*qa, lang) for o in scene.objects for lang in ("en", "zh")
        for qa in questions(scene, rng, lang, about=o, keyed=keyed)])
    chart_rows = _extra_scenes("chart", chart_images, seed, out, images, to_render, lambda scene, rng: [
        (*qa, lang) for lang in ("en", "zh") for qa in chart_superlatives(scene, lang)])
    _render_all(to_render, spec["size"])
    rng = random.Random(f"scenes-{seed}-shuffle")
    rng.shuffle(sft_rows)
    rng.shuffle(pre_rows)
    random.Random(f"scenes-{seed}-shuffle-sft").shuffle(more_rows)
    sft_rows += more_rows + pair_rows + chart_rows  # after the train rows (training samples rows in random order anyway)
    _write_jsonl(out / "clip_pretrain.jsonl", clip_rows)
    _write_jsonl(out / "vlm_pretrain.jsonl", pre_rows)
    _write_jsonl(out / "vlm_sft.jsonl", sft_rows)
    _write_jsonl(out / "eval" / "vqa.jsonl", vqa_rows)
    _write_jsonl(out / "eval" / "captions.jsonl", cap_rows)
    summary = {
        "scale": scale, "seed": seed, "images_rendered": images, "image_size": spec["size"], "image_root": "images",
        "train_images": spec["train"], "eval_images": spec["eval"], "clip_only_images": spec["clip"],
        "sft_only_images": spec.get("sft", 0), "pair_images": pair_images, "chart_images": chart_images,
        "keyed_answers": keyed,
        "clip_pretrain": len(clip_rows), "vlm_pretrain": len(pre_rows), "vlm_sft": len(sft_rows),
        "eval_vqa": len(vqa_rows), "eval_vqa_unseen_combo": sum(r["unseen_combo"] for r in vqa_rows),
        "held_out_pairs": sorted(f"{c}+{s}" for c, s in HELD_OUT_PAIRS),
    }
    (out / "scenes.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if images:  # written last: proves that every image is on disk (the pipeline's marker)
        (out / "images" / "rendered.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _extra_scenes(kind: str, count: int, seed: int, out: Path, images: bool,
                  to_render: list[tuple[Scene, Path]],
                  ask: Callable[[Scene, random.Random], list[tuple[str, str, str, str]]]) -> list[dict]:
    """`count` training scenes of `kind` in `images/<kind>s/` and their SFT rows, shuffled: `ask(scene, rng)`
    lists each scene's (type, question, answer, lang)."""
    rng, rows = random.Random(f"scenes-{seed}-{kind}s"), []
    if images and count:
        (out / "images" / f"{kind}s").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene, image = sample_scene(rng, "train", kind), f"{kind}s/{i:06d}.png"
        if images:
            to_render.append((scene, out / "images" / image))
        rows += [{"conversations": _chat(q, a), "image": image, "type": qtype, "lang": lang}
                 for qtype, q, a, lang in ask(scene, rng)]
    random.Random(f"scenes-{seed}-shuffle-{kind}s").shuffle(rows)
    return rows


def _render_batch(jobs: list[tuple[Scene, Path]], size: int) -> None:
    for scene, path in jobs:
        render(scene, size).save(path, optimize=False)


PARALLEL_RENDER_MIN = 2000  # fewer images render faster in this process than a pool starts


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _render_all(jobs: list[tuple[Scene, Path]], size: int) -> None:
    """Draw every scene to its path, in chunks over the CPU's cores: the images are the same either way,
    in less time (tiny's 64k images on 2 cores: see `bench/bench_scene_render.py`)."""
    workers = min(usable_cores(), 8)
    if workers < 2 or len(jobs) < PARALLEL_RENDER_MIN:
        _render_batch(jobs, size)
        return
    chunk = min(500, -(-len(jobs) // workers))  # enough chunks to keep every worker busy
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_render_batch, chunks, [size] * len(chunks)))  # list(): re-raises a worker's error


if __name__ == "__main__":  # standalone use; `python -m data.synth` calls write_scene_splits itself
    import argparse

    parser = argparse.ArgumentParser(prog="python -m data.scenes", description="write the synthetic scene splits")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", default="tiny", choices=sorted(SCALES))
    parser.add_argument("--no-images", action="store_true", help="captions and questions only, no rendering")
    parser.add_argument("--keyed-answers", action=argparse.BooleanOptionalAction, default=None,
                        help='answer a question about one of several objects key first: "circle red" '
                             "(default: the scale's)")
    parser.add_argument("--pair-images", type=int, default=None,
                        help="extra two-object scenes for VLM SFT, both objects asked about, rows last "
                             "(default: the scale's)")
    parser.add_argument("--chart-images", type=int, default=None,
                        help="extra bar charts for VLM SFT, asked for the tallest and the shortest bar, rows last "
                             "(default: the scale's)")
    cli = parser.parse_args()
    print(json.dumps(write_scene_splits(cli.out, cli.seed, cli.scale, images=not cli.no_images,
                                        keyed=cli.keyed_answers, pair_images=cli.pair_images,
                                        chart_images=cli.chart_images), indent=2))
