"""GRPO (Shao et al. 2024): `python -m training.grpo --data WORLD_DIR --init REASON_DIR --out DIR`.

Per prompt, sample a group of G responses, score each with rule-based rewards (`training.rewards`:
exact answer + think/answer format), and push up the responses that beat their group's mean:
advantage A_i = (r_i - mean(r)) / (std(r) + eps) — no value network. Objective per response token:
min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) - beta * KL(pi || ref), with the k3 KL estimator
exp(ref - logp) - (ref - logp) - 1 against the frozen starting model, bounded per token at `KL_CAP`.
With `--num-iterations` mu = 1 (the default) there is one policy update per rollout, so rho =
exp(logp - logp.detach()) equals 1 in value and carries the policy gradient; with mu > 1 each rollout
serves mu consecutive loss calls, i.e. optimizer steps at `--grad-accum 1` (the GRPO paper's mu, TRL's
`num_iterations`), rho is taken against the log-probs it was sampled with and the clip bounds it (the
batches drawn meanwhile are skipped, so a run of S steps samples S / mu batches).

Sampling happens inside the loss function, so the shared Trainer (accumulation, clipping, schedule,
checkpoints) runs GRPO like any other stage; a batch is a list of prompts.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from training.rewards import answer_reward, format_reward
from training.trainer import LossOutput, Trainer
from vlm.generation import fast_generate
from vlm.tokenizer import EOS_ID, PAD_ID, render_chat


class PromptDataset(Dataset):
    """Verifiable questions `{"messages", "answer"}` -> prompt token ids (chat template, generation prompt)."""

    def __init__(self, path, tokenizer, max_len: int):
        self.items = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    ids = tokenizer(render_chat(rec["messages"], add_generation_prompt=True),
                                    add_special_tokens=False).input_ids
                    self.items.append({"prompt_ids": ids[-max_len:], "answer": str(rec["answer"])})
                except (ValueError, KeyError, TypeError) as e:
                    print(f"[grpo] {path}:{lineno}: skipped: {e}")
        if not self.items:
            raise ValueError(f"{path}: no usable prompts")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def prompt_collate(items: list[dict]) -> dict:
    return {"prompt_ids": [it["prompt_ids"] for it in items], "answers": [it["answer"] for it in items]}


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(rows):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    return ids, mask


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps); rewards are laid out prompt-major ([B * G])."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)).view(-1)


def token_logps(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, <t]) for t >= 1: [B, T-1]."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


KL_CAP = 10.0  # per-token bound of the KL estimate (and of the log-ratio inside it)


def grpo_objective(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor,
                   resp_mask: torch.Tensor, clip_eps: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence loss [N] (mean over its response tokens) and per-sequence mean KL."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    # k3 is exp(delta) - delta - 1: a token the policy sampled at, say, 1e-7 that the reference gives 0.1
    # scores 1e6 and its gradient swamps the batch (a tiny GRPO run logged a step's mean KL at 152436).
    # Bounded as verl's `low_var_kl` is: such tokens add at most KL_CAP and no gradient.
    delta = (ref_logp - logp).clamp(-KL_CAP, KL_CAP)
    kl = (torch.exp(delta) - delta - 1).clamp(max=KL_CAP)
    per_token = -(surrogate - beta * kl)
    n = resp_mask.sum(1).clamp(min=1)
    return (per_token * resp_mask).sum(1) / n, ((kl * resp_mask).sum(1) / n).detach()


def make_grpo_loss(ref_model, tokenizer, group: int, max_new_tokens: int, temperature: float,
                   clip_eps: float, beta: float, format_weight: float, seed: int = 0, num_iterations: int = 1):
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    gen = torch.Generator()
    gen.manual_seed(seed)
    state: dict = {"rollout": None, "uses": 0}

    def loss_fn(model, batch: dict) -> LossOutput:
        if state["rollout"] is None or state["uses"] == num_iterations:
            state["rollout"], state["uses"] = rollout(model, batch), 0
        state["uses"] += 1
        r = state["rollout"]
        logp = token_logps(model, r["ids"], r["mask"])
        if r["old_logp"] is None:  # first use: the policy that sampled it
            r["old_logp"] = logp.detach()
        per_seq, kl = grpo_objective(logp, r["old_logp"], r["ref_logp"], r["adv"], r["resp"], clip_eps, beta)
        return LossOutput(loss_sum=per_seq.sum(), count=len(per_seq), metrics={**r["metrics"], "kl": kl.mean().item()})

    @torch.no_grad()
    def rollout(model, batch: dict) -> dict:
        policy = getattr(model, "module", model)  # DDP-wrapped or not
        device = next(policy.parameters()).device
        prompts = [p for p in batch["prompt_ids"] for _ in range(group)]
        answers = [a for a in batch["answers"] for _ in range(group)]
        p_ids, p_mask = left_pad(prompts)
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        g = gen if device.type == "cpu" else None
        new = fast_generate(policy, p_ids, max_new_tokens, attention_mask=p_mask, temperature=temperature,
                            eos_token_id=EOS_ID, generator=g)
        # Response mask: generated tokens up to and including the first EOS.
        is_eos = new == EOS_ID
        after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
        r_mask = (~after_eos).long()
        texts = [tokenizer.decode([t for t, m in zip(row, mk) if m and t != EOS_ID], skip_special_tokens=True)
                 for row, mk in zip(new.tolist(), r_mask.tolist())]
        correct = torch.tensor([answer_reward(t, a) for t, a in zip(texts, answers)])
        fmt = torch.tensor([format_reward(t) for t in texts])
        rewards = (1 - format_weight) * correct + format_weight * fmt
        adv = group_advantages(rewards, group).to(device)

        ids = torch.cat([p_ids, new.masked_fill(r_mask == 0, PAD_ID)], dim=1)
        mask = torch.cat([p_mask, r_mask], dim=1)
        resp = torch.cat([torch.zeros_like(p_mask), r_mask], dim=1)[:, 1:].float()
        if next(ref_model.parameters()).device != device:
            ref_model.to(device)
        metrics = {"reward": rewards.mean().item(), "correct": correct.mean().item(), "format": fmt.mean().item(),
                   "resp_len": r_mask.sum(1).float().mean().item()}
        return {"ids": ids, "mask": mask, "resp": resp, "adv": adv, "ref_logp": token_logps(ref_model, ids, mask),
                "old_logp": None, "metrics": metrics}
    return loss_fn


def main(argv: list[str] | None = None) -> dict:
    from training.cli import config_from_args
    from training.lm_stage import build_parser
    from training.posttrain_pipeline import load_policy_and_reference, parse_stage, posttrain_file, saver

    p = build_parser("grpo", __doc__.splitlines()[0])
    p.add_argument("--group", type=int, help="responses sampled per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, help="longest sampled response")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--beta", type=float, default=0.04, help="weight of the KL to the reference")
    p.add_argument("--format-weight", type=float, default=0.2, help="share of the reward for the think/answer format")
    p.add_argument("--num-iterations", type=int, default=1, help="loss calls per rollout, i.e. optimizer steps at --grad-accum 1 (the GRPO paper's mu)")
    args, _ = parse_stage(p, "grpo", argv)
    if not args.init:
        raise SystemExit("--init: GRPO starts from an SFT (ideally reasoning-distilled) checkpoint folder")
    model, ref, tokenizer, tok_dir = load_policy_and_reference(args.init)
    dataset = PromptDataset(posttrain_file(args.data, "grpo_train.jsonl"), tokenizer, args.max_len)
    loss_fn = make_grpo_loss(ref, tokenizer, args.group or 8, args.max_new_tokens or 64, args.temperature, args.clip_eps,
                             args.beta, args.format_weight, args.seed, args.num_iterations)
    trainer = Trainer(model, dataset, prompt_collate, loss_fn, config_from_args(args),
                      count_fn=lambda b: len(b["answers"]) * args.group, save_fn=saver(tok_dir))
    summary = trainer.train()
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))}, indent=2))
    return summary


if __name__ == "__main__":
    main()
