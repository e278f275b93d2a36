"""The shared Trainer: exact resume after a real kill, DDP equivalence, accumulation, atomic state, freezing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.lm_stage import causal_lm_loss
from training.trainer import STATE_DIR, LossOutput, TrainConfig, Trainer, lr_at
from vlm import MiniMindConfig, MiniMindForCausalLM

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A micro synthetic world with its tokenizer: what `training.pretrain` reads."""
    root = tmp_path_factory.mktemp("trainer_world")
    from data.synth.__main__ import main as synth
    from training.train_tokenizer import main as train_tokenizer
    synth(["--out", str(root), "--seed", "0", "--scale", "micro"])
    train_tokenizer(["--data", str(root), "--out", str(root / "tokenizer"), "--vocab-size", "500"])
    return root


def pretrain_cmd(world: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.pretrain", "--data", str(world), "--out", str(out), "--preset", "micro",
            "--device", "cpu", "--dtype", "fp32", "--no-progress", "--log-every", "1", *extra]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_resume_after_kill_equals_uninterrupted_run(world, tmp_path):
    # batch 32 makes a step slow enough (~0.1 s) that the kill lands between the checkpoint at 10 and the end
    # --ema-decay: the weight average is part of the state; a resume that lost it would save a different model
    common = ("--max-steps", "20", "--batch-size", "32", "--ema-decay", "0.9")
    run(pretrain_cmd(world, tmp_path / "straight", *common, "--save-every", "0"))

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(pretrain_cmd(world, killed, *common, "--save-every", "10"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = killed / STATE_DIR / "state.json"
    deadline = time.time() + 300
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert json.loads(state.read_text())["step"] == 10
    assert not (killed / "model.safetensors").exists()
    logged_steps = [json.loads(r)["step"] for r in (killed / "metrics.jsonl").read_text().splitlines() if r.strip()]

    run(pretrain_cmd(world, killed, *common, "--save-every", "10", "--resume"))
    diff = max_abs_diff(weights(tmp_path / "straight"), weights(killed))
    assert diff <= 1e-6, diff
    # same data order, same losses: the resumed log continues the killed one step for step
    straight = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(r) for r in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 21)), logged_steps
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)


@pytest.mark.slow
def test_ddp_two_processes_equal_one(world, tmp_path):
    run(pretrain_cmd(world, tmp_path / "one", "--max-steps", "10", "--batch-size", "8", "--save-every", "0"))
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", *pretrain_cmd(world, tmp_path / "two", "--max-steps", "10", "--batch-size", "4", "--save-every", "0")[2:]])
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    rel = max(float((one[k] - two[k]).norm() / one[k].norm().clamp_min(1e-12)) for k in one)
    assert rel <= 1e-4, rel
    counts = [[json.loads(r)["count"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert counts[0] == counts[1]  # the same samples in every global batch


def tiny_model(seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2))


def random_samples(n: int = 32, seq: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # uneven supervised lengths make the exact normalisation matter
    return [torch.randint(1, 64, (seq - (i % 5),), generator=g) for i in range(n)]


def collate(items: list[torch.Tensor]) -> dict:
    from data.collate import pad_collate
    return pad_collate([{"input_ids": x, "labels": x.clone()} for x in items])


def train_tiny(tmp: Path, float64: bool = False, **cfg) -> MiniMindForCausalLM:
    model = tiny_model().double() if float64 else tiny_model()
    config = TrainConfig(out=str(tmp), device="cpu", dtype="fp32", progress=False, lr=1e-2, **cfg)
    Trainer(model, random_samples(), collate, causal_lm_loss, config).train()
    return model


def test_accumulation_equals_the_bigger_batch(tmp_path):
    # float64: the two runs sum the same gradients in a different order, and Adam divides tiny gradient
    # entries by their own tiny second moments, so fp32 rounding alone reaches ~1e-5 after a few steps on
    # some CPUs; in float64 any normalisation error would still show, rounding would not.
    big = train_tiny(tmp_path / "big", float64=True, max_steps=6, batch_size=8)
    acc = train_tiny(tmp_path / "acc", float64=True, max_steps=6, batch_size=2, grad_accum=4)
    diff = max(float((a - b).abs().max()) for a, b in zip(big.state_dict().values(), acc.state_dict().values()))
    assert diff <= 1e-9, diff


@pytest.mark.parametrize("native", [True, False])
def test_fast_dtype_is_bf16_only_on_a_cpu_with_bf16_kernels(tmp_path, monkeypatch, native):
    import training.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "cpu_has_bf16_kernels", lambda: native)
    config = TrainConfig(out=str(tmp_path), max_steps=1, batch_size=4, device="cpu", dtype="fast", progress=False)
    trainer = Trainer(tiny_model(), random_samples(), collate, causal_lm_loss, config)
    assert trainer.autocast_dtype == (torch.bfloat16 if native else None)
    auto = Trainer(tiny_model(), random_samples(), collate, causal_lm_loss,
                   TrainConfig(out=str(tmp_path / "auto"), device="cpu", dtype="auto", progress=False))
    assert auto.autocast_dtype is None  # auto stays fp32 on every CPU


def test_bf16_forward_on_cpu_takes_the_math_attention_kernel_with_the_same_gradients():
    import torch.nn.functional as F
    from training.trainer import forward_context
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 64, requires_grad=True) for _ in range(3))

    def attend(context):
        with context:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            flash_allowed = torch.backends.cuda.flash_sdp_enabled()
        out.float().square().sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        q.grad = k.grad = v.grad = None
        return out.detach().float(), grads, flash_allowed

    cpu = torch.device("cpu")
    out_math, grads_math, flash_in_trainer = attend(forward_context(cpu, torch.bfloat16))
    out_default, grads_default, flash_by_default = attend(torch.autocast("cpu", dtype=torch.bfloat16))
    assert flash_by_default and not flash_in_trainer
    assert torch.allclose(out_math, out_default, atol=3e-2)
    for ours, default in zip(grads_math, grads_default):
        assert (ours - default).norm() / default.norm() < 2e-2
    with forward_context(cpu, None):  # fp32 keeps the default kernels
        assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # and the setting does not leak out


def test_frozen_parameters_stay_bit_identical(tmp_path):
    start = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    model = tiny_model()
    config = TrainConfig(out=str(tmp_path), max_steps=4, batch_size=4, device="cpu", dtype="fp32", progress=False)
    Trainer(model, random_samples(), collate, causal_lm_loss, config,
            trainable=lambda name, p: ".mlp." in name).train()
    after = model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all(".mlp." in k for k in changed), sorted(changed)


def test_ema_saves_the_running_average_of_the_weights_it_trained(tmp_path):
    seen = []  # the weights each step starts from: W0 .. W(N-1)

    def recording_loss(model, batch):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return causal_lm_loss(model, batch)

    steps, decay = 8, 0.3  # the warm-up (1 + t) / (10 + t) is below 0.3 for t < 4, so both regimes show
    model = tiny_model().double()
    config = TrainConfig(out=str(tmp_path / "ema"), device="cpu", dtype="fp32", progress=False, lr=1e-2,
                         max_steps=steps, batch_size=4, ema_decay=decay)
    Trainer(model, random_samples(), collate, recording_loss, config,
            trainable=lambda name, p: "embed" not in name).train()
    # the same run without the average: the same trajectory, so its final weights are W(N)
    plain = tiny_model().double()
    config = TrainConfig(out=str(tmp_path / "plain"), device="cpu", dtype="fp32", progress=False, lr=1e-2,
                         max_steps=steps, batch_size=4)
    Trainer(plain, random_samples(), collate, causal_lm_loss, config, trainable=lambda name, p: "embed" not in name).train()
    expected = dict(seen[0])
    for t, w in enumerate(seen[1:] + [{n: p.detach() for n, p in plain.named_parameters()}]):
        d = min(decay, (1 + t) / (10 + t))
        expected = {n: d * expected[n] + (1 - d) * w[n] for n in expected}
    got = {n: p.detach() for n, p in model.named_parameters()}
    assert max(float((got[n] - expected[n]).abs().max()) for n in got) <= 1e-12
    moved = [n for n in got if not torch.equal(got[n], plain.state_dict()[n])]
    assert moved and all("embed" not in n for n in moved)  # the average differs from the last weights; frozen ones do not
    saved = weights(tmp_path / "ema")
    assert all(torch.equal(saved[n], got[n]) for n in saved if n in got)  # the file holds the average too


def test_compiled_blocks_train_the_same_weights_under_the_same_names(tmp_path):
    from training.trainer import compile_blocks
    assert compile_blocks(tiny_model()) == ["model.layers.0", "model.layers.1"]  # the decoder layers, not the model
    eager = train_tiny(tmp_path / "eager", max_steps=4, batch_size=4, log_every=1)
    compiled = train_tiny(tmp_path / "compiled", max_steps=4, batch_size=4, log_every=1, compile=True)
    # The batches are of uneven length (dynamic shapes). Inductor fuses RMSNorm's fp32
    # arithmetic, so results agree to float rounding (~5e-7 a norm), which Adam's 1e-2 steps carry to ~1e-5.
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("eager", "compiled")]
    assert len(losses[0]) == 4 and all(abs(a - b) < 1e-5 * a for a, b in zip(*losses))
    assert max_abs_diff(eager.state_dict(), compiled.state_dict()) < 1e-4
    assert weights(tmp_path / "compiled").keys() == weights(tmp_path / "eager").keys()  # no `_orig_mod.` prefix


def test_interrupted_state_write_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    train_tiny(out, max_steps=4, batch_size=4, save_every=2)
    good = json.loads((out / STATE_DIR / "state.json").read_text())
    assert good["step"] == 4
    # a kill while writing leaves a partial scratch folder beside the finished one
    scratch = out / f"{STATE_DIR}.tmp"
    scratch.mkdir()
    (scratch / "model.safetensors").write_bytes(b"\0" * 100)
    # a kill between the two renames leaves only the previous folder, under .old
    (out / STATE_DIR).rename(out / f"{STATE_DIR}.old")
    model = tiny_model()
    trainer = Trainer(model, random_samples(), collate, causal_lm_loss,
                      TrainConfig(out=str(out), max_steps=4, batch_size=4, device="cpu", dtype="fp32",
                                  progress=False, resume=True))
    assert trainer.load_state() and trainer.step == 4
    reference = load_file(str(out / "model.safetensors"))
    for k, v in model.state_dict().items():
        if k in reference:
            assert torch.equal(v, reference[k]), k


def test_loss_is_normalised_by_the_global_count(tmp_path):
    """One step's logged loss is the token-weighted mean, not the mean of micro-batch means."""
    model = tiny_model()
    samples = random_samples(8)
    cfg = TrainConfig(out=str(tmp_path), max_steps=1, batch_size=2, grad_accum=4, device="cpu", dtype="fp32",
                      progress=False, log_every=1, lr=0.0)
    Trainer(model, samples, collate, causal_lm_loss, cfg).train()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    with torch.no_grad():
        out = causal_lm_loss(tiny_model(), collate(samples))
    assert row["count"] == out.count
    assert row["loss"] == pytest.approx(out.loss_sum.item() / out.count, rel=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(out="x", lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_custom_loss_and_count(tmp_path):
    """A stage-defined loss (here: regression) trains through the same loop; the metrics it returns are logged."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    xs = [torch.randn(3) for _ in range(64)]

    def loss_fn(m, batch):
        err = (m(batch["x"]).squeeze(-1) - batch["x"].sum(-1)) ** 2
        return LossOutput(loss_sum=err.sum(), count=len(err), metrics={"mse": float(err.detach().mean())})

    cfg = TrainConfig(out=str(tmp_path), max_steps=150, batch_size=16, lr=0.1, device="cpu", dtype="fp32",
                      progress=False, log_every=10)
    summary = Trainer(model, xs, lambda items: {"x": torch.stack(items)}, loss_fn, cfg,
                      save_fn=lambda m, d: torch.save({}, Path(d) / "done.pt")).train()
    assert summary["final_loss"] < 0.05 * summary["first_loss"]
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "mse" in rows[-1] and (tmp_path / "done.pt").is_file() and (tmp_path / "loss.png").is_file()
