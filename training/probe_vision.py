"""What a frozen vision encoder's patch tokens hold: linear (ridge) probes on fresh synthetic scenes.

`python -m training.probe_vision --vision CLIP_DIR_OR_NAME [--train 1500] [--test 300]`
`python -m training.probe_vision --vlm VLM_DIR ...`

For each question a scene answers (position and shape of a single shape, the word of a text scene,
the colour of a chart's shortest bar), the probe fits a ridge classifier on `--train` fresh
training-split scenes and scores `--test` others, once on the flattened patch tokens of every layer
(slot-specific weights: what the tokens hold at all) and once on their mean (one weight vector for
every slot, the kind of readout attention does easily). If a probe is high and the VLM's answers
are low, the VLM is not reading what the encoder gives it.

`--vision` also probes two-object scenes for binding: from the 2x2 patches nearest one object, the
shape of that object (`pair_own_shape`) and of the other one (`pair_other_shape`). A token that
reads the other object's shape as well as its own describes the whole picture, not its place, and
"the tokens of the red object" then name both shapes.

`--vlm` follows the same information through a trained MiniMind-V, with the question asked: the
projected image tokens (`projected`), the image tokens' hidden states after each LM layer
(`lm_<k>_image`) and the hidden state at the position that predicts the answer (`lm_<k>_answer`).
Where the accuracy falls between two of them is where the VLM loses what it was given.
Prints JSON: `{question: {feature: accuracy}}` plus the chance level of each question.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable

import torch

from data.scenes import COLOURS, POSITIONS, SHAPES, WORDS, Obj, Scene, sample_scene, shortest_bar
from data.scenes_render import render
from vlm.vision import VisionEncoder, captured_outputs

QUESTIONS: dict[str, tuple[str, Callable[[Scene], int], int]] = {  # name -> (scene kind, label, classes)
    "position": ("single", lambda s: list(POSITIONS).index(s.objects[0].position), len(POSITIONS)),
    "shape": ("single", lambda s: list(SHAPES).index(s.objects[0].shape), len(SHAPES)),
    "word": ("text", lambda s: WORDS.index(s.text), len(WORDS)),
    "shortest_bar": ("chart", lambda s: list(COLOURS).index(shortest_bar(s)), len(COLOURS)),
}
PROMPTS = {"position": "Where is the shape?", "shape": "What shape is shown?",  # what --vlm asks
           "word": "What is written in the image?", "shortest_bar": "Which bar is the shortest?"}


def ridge_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   classes: int, lam: float = 10.0) -> float:
    """Top-1 accuracy of a one-vs-all ridge classifier (standardised features, dual form: n << d)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    targets = torch.nn.functional.one_hot(y_train, classes).double()
    gram = x_train.double() @ x_train.double().T
    alpha = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), targets)
    scores = x_test.double() @ x_train.double().T @ alpha
    return float((scores.argmax(1) == y_test).float().mean())


def _concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-batch feature dicts -> one `[B, -1]` float tensor per feature."""
    return {name: torch.cat([b[name].reshape(len(b[name]), -1).float() for b in batches]) for name in batches[0]}


@torch.inference_mode()
def layer_features(encoder: VisionEncoder, images: list, batch_size: int = 100) -> dict[str, torch.Tensor]:
    """`{"layer_i": [B, N*D], ..., "final": [B, N*D], "final_mean": [B, D]}` (class token dropped)."""
    batches = []
    with captured_outputs(encoder.visual.transformer.resblocks) as captured:
        for start in range(0, len(images), batch_size):
            final = encoder(encoder.pixel_values(images[start:start + batch_size]))
            n = final.shape[1]
            feats = {f"layer_{k}": h[:, -n:] for k, h in captured.items()}  # the last N tokens are the patches
            batches.append(feats | {"final": final, "final_mean": final.mean(1)})
    return _concat(batches)


@torch.inference_mode()
def vlm_features(model, processor, images: list, question: str, batch_size: int = 100) -> dict[str, torch.Tensor]:
    """`{"projected", "lm_<k>_image": [B, N*H], "lm_<k>_answer": [B, H]}` of a MiniMind-V asked `question`."""
    batches = []
    with captured_outputs(model.model.layers, pick=lambda output: output[0]) as captured:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = processor(messages=[[{"role": "user", "content": f"<image>\n{question}"}]] * len(chunk),
                              images=[[im] for im in chunk])
            ids = batch["input_ids"]
            slots = ids[0] == model.config.image_token_id  # same prompt: same slots in every row
            embeds = model.embed_inputs(ids, batch["pixel_values"])  # encoder and projector run once
            model.model(inputs_embeds=embeds, bidirectional_blocks=model.image_blocks(ids))
            feats = {"projected": embeds[:, slots]}
            for k, hidden in sorted(captured.items()):
                feats[f"lm_{k}_image"], feats[f"lm_{k}_answer"] = hidden[:, slots], hidden[:, -1]
            batches.append(feats)
    return _concat(batches)


def probe(encoder: VisionEncoder, n_train: int = 1500, n_test: int = 300, seed: int = 0) -> dict:
    """Probes of the encoder's patch tokens (every layer, and their mean)."""
    return _probe(lambda images, name: layer_features(encoder, images), encoder.image_size, n_train, n_test, seed)


def object_patches(obj: Obj, grid: int) -> list[int]:
    """Indices (row-major in a `grid` x `grid` patch grid) of the 2x2 patches nearest `obj`'s centre."""
    x0 = min(max(int(obj.x * grid - 0.5), 0), grid - 2)
    y0 = min(max(int(obj.y * grid - 0.5), 0), grid - 2)
    return [(y0 + dy) * grid + x0 + dx for dy in (0, 1) for dx in (0, 1)]


def probe_pairs(encoder: VisionEncoder, n_train: int = 1500, n_test: int = 300, seed: int = 0) -> dict:
    """Binding probes on two-object scenes: from the patches at the first object (every layer), that
    object's shape and the other object's."""
    rng_train, rng_test = random.Random(f"probe-{seed}-pair-train"), random.Random(f"probe-{seed}-pair-test")
    scenes = ([sample_scene(rng_train, "train", "pair") for _ in range(n_train)]
              + [sample_scene(rng_test, "train", "pair") for _ in range(n_test)])
    feats = layer_features(encoder, [render(s, encoder.image_size) for s in scenes])
    n, grid = encoder.num_patches, round(encoder.num_patches ** 0.5)
    at_object = {name: torch.stack([f.reshape(n, -1)[object_patches(s.objects[0], grid)].flatten()
                                    for s, f in zip(scenes, feats[name])])
                 for name in feats if name != "final_mean"}
    report = {}
    for key, which in (("pair_own_shape", 0), ("pair_other_shape", 1)):
        y = torch.tensor([list(SHAPES).index(s.objects[which].shape) for s in scenes])
        report[key] = {name: round(ridge_accuracy(x[:n_train], y[:n_train], x[n_train:], y[n_train:], len(SHAPES)), 3)
                       for name, x in at_object.items()}
        report[key]["chance"] = round(1 / len(SHAPES), 3)
    return report


def probe_vlm(model, processor, n_train: int = 1500, n_test: int = 300, seed: int = 0) -> dict:
    """Probes along a MiniMind-V: projected image tokens, then each LM layer's image and answer states."""
    model.eval()
    return _probe(lambda images, name: vlm_features(model, processor, images, PROMPTS[name]),
                  model.vision.image_size, n_train, n_test, seed)


def _probe(featurize: Callable[[list, str], dict[str, torch.Tensor]], size: int, n_train: int, n_test: int,
           seed: int) -> dict:
    report: dict = {}
    for name, (kind, label, classes) in QUESTIONS.items():
        rng_train, rng_test = random.Random(f"probe-{seed}-{name}-train"), random.Random(f"probe-{seed}-{name}-test")
        train = [sample_scene(rng_train, "train", kind) for _ in range(n_train)]
        test = [sample_scene(rng_test, "train", kind) for _ in range(n_test)]
        f_train = featurize([render(s, size) for s in train], name)
        f_test = featurize([render(s, size) for s in test], name)
        y_train, y_test = torch.tensor([label(s) for s in train]), torch.tensor([label(s) for s in test])
        report[name] = {feat: round(ridge_accuracy(f_train[feat], y_train, f_test[feat], y_test, classes), 3)
                        for feat in f_train}
        report[name]["chance"] = round(1 / classes, 3)
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.probe_vision", description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--vision", help="a CLIP checkpoint folder (training.pretrain_clip) or an open_clip name")
    what.add_argument("--vlm", help="a MiniMind-V folder: probe its projected tokens and LM hidden states")
    p.add_argument("--train", type=int, default=1500, help="fresh scenes the probe is fitted on, per question")
    p.add_argument("--test", type=int, default=300, help="fresh scenes it is scored on, per question")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.vlm:
        from vlm.modeling_vlm import MiniMindVLM
        from vlm.processor import VLMProcessor
        report = probe_vlm(MiniMindVLM.from_pretrained(args.vlm), VLMProcessor.from_pretrained(args.vlm),
                           args.train, args.test, args.seed)
    else:
        encoder = (VisionEncoder.from_open_clip(pretrained=args.vision) if Path(args.vision).is_dir()
                   else VisionEncoder.from_open_clip(args.vision))
        sizes = (args.train, args.test, args.seed)
        report = probe(encoder, *sizes) | probe_pairs(encoder, *sizes)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
