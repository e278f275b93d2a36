"""Direct Preference Optimisation (Rafailov et al. 2023): `python -m training.dpo --data DIR --init SFT_DIR --out DIR`.

Data: `{"chosen": [msgs], "rejected": [msgs]}` jsonl; a world folder means its `dpo.jsonl` (else
`posttrain/dpo_train.jsonl`), held out: `eval/dpo.jsonl` (else `posttrain/dpo_eval.jsonl`).
Policy and reference start from the same checkpoint. The reference is frozen, so its log-probs are
computed once up front and stored with the dataset: each training step then runs one model, not two.

loss = -(1 - eps) * log sigmoid(beta * m) - eps * log sigmoid(-beta * m),
m = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), summed over response
tokens (as minimind, no length normalisation). With pi == ref, m = 0 and the loss is ln 2 for any eps.
`--rpo-alpha a` adds a * (mean NLL of the chosen answer's tokens), as TRL's `rpo_alpha` (Pang et al.
2024): DPO alone may lower the chosen answer's likelihood too, as long as the rejected one falls
faster, and greedy answers then drift from the SFT model's.
`--trainable REGEX` trains only the parameters whose names match (the rest stay bit-identical); the
tiny preset trains the final norm alone, for the reason given in `training.posttrain_pipeline`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data.datasets import DPODataset
from training.trainer import LossOutput, Trainer


# ---------------------------------------------------------------- the maths

def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   labels: torch.Tensor) -> torch.Tensor:
    """Sum over supervised positions (label != -100) of log p(token | prefix), one value per row."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return -nll.sum(-1)


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Supervised tokens per row (the positions `sequence_logps` sums over)."""
    return (labels[:, 1:] != -100).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0):
    """Per-pair sigmoid DPO loss and the implicit rewards beta * (log pi - log ref) of each side."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    # label smoothing (cDPO): the preference label is wrong with probability eps.
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_reward.detach(), rejected_reward.detach()


# ---------------------------------------------------------------- data

class PreferenceDataset(DPODataset):
    """`data.datasets.DPODataset` (assistant-only labels on both sides); after `attach_reference`, each
    item also carries the frozen reference's log-probs of its chosen and rejected answers."""

    def __init__(self, path: str | Path, tokenizer, max_len: int, skip_bad: bool = True):
        super().__init__(path, tokenizer, max_len, skip_bad=skip_bad)
        self.ref: torch.Tensor | None = None  # [N, 2] (chosen, rejected)

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if self.ref is not None:
            item["ref_logps"] = self.ref[i]
        return item


def pair_collate(items: list[dict]) -> dict:
    """One right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones."""
    rows = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
    labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad id 0
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)], lab[i, :len(l)], mask[i, :len(r)] = torch.as_tensor(r), torch.as_tensor(l), 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": lab, "n_pairs": len(items)}
    if "ref_logps" in items[0]:
        batch["ref_logps"] = torch.stack([it["ref_logps"] for it in items])
    return batch


@torch.no_grad()
def pair_logps(model, dataset: Dataset, batch_size: int = 16, device: str | torch.device = "cpu") -> torch.Tensor:
    """[N, 2] (chosen, rejected) summed log-probs of every pair under `model`, in dataset order."""
    was_training = model.training
    model.eval()
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=pair_collate):
        lp = sequence_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                            batch["labels"].to(device)).float().cpu()
        n = batch["n_pairs"]
        out.append(torch.stack([lp[:n], lp[n:]], dim=1))
    model.train(was_training)
    return torch.cat(out)


def attach_reference(dataset: PreferenceDataset, ref_model, batch_size: int = 16) -> PreferenceDataset:
    """Score every pair with the frozen reference once; training then never runs the reference."""
    dataset.ref = pair_logps(ref_model, dataset, batch_size, next(ref_model.parameters()).device)
    return dataset


def make_dpo_loss(beta: float, label_smoothing: float = 0.0, rpo_alpha: float = 0.0):
    """Trainer loss_fn: summed DPO loss (+ rpo_alpha * per-token NLL of chosen) over the pairs of the
    micro-batch (count = pairs)."""
    def loss_fn(model, batch: dict) -> LossOutput:
        n = batch["n_pairs"]
        lp = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        ref = batch["ref_logps"].to(lp.device)
        losses, rc, rr = dpo_loss(lp[:n], lp[n:], ref[:, 0], ref[:, 1], beta, label_smoothing)
        metrics = {"reward_chosen": rc.mean().item(), "reward_rejected": rr.mean().item(),
                   "reward_margin": (rc - rr).mean().item(), "pref_acc": (rc > rr).float().mean().item()}
        if rpo_alpha:
            chosen_nll = -lp[:n] / response_lengths(batch["labels"][:n]).to(lp.device).clamp(min=1)
            losses = losses + rpo_alpha * chosen_nll
            metrics["chosen_nll"] = chosen_nll.mean().item()
        return LossOutput(loss_sum=losses.sum(), count=n, metrics=metrics)
    return loss_fn


def preference_metrics(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> dict[str, float]:
    """Held-out preference accuracy (implicit reward of chosen > rejected, TRL's `rewards/accuracies`),
    margin and loss; plus `likelihood_acc`, how often the policy itself gives the chosen answer the
    higher log-likelihood. The first measures what DPO changed, the second what the model prefers:
    on a fact the SFT model already knows, DPO has little left to change, so the implicit reward
    can sit near chance while the likelihood ranking is right."""
    rc, rr = beta * (policy_logps[:, 0] - ref_logps[:, 0]), beta * (policy_logps[:, 1] - ref_logps[:, 1])
    losses, _, _ = dpo_loss(policy_logps[:, 0], policy_logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], beta)
    return {"pref_acc": (rc > rr).float().mean().item(), "reward_margin": (rc - rr).mean().item(),
            "likelihood_acc": (policy_logps[:, 0] > policy_logps[:, 1]).float().mean().item(),
            "loss": losses.mean().item(), "ln2": math.log(2)}


# ---------------------------------------------------------------- stage

def main(argv: list[str] | None = None) -> dict:
    from training.lm_stage import build_parser
    from training.posttrain_pipeline import (DPO_EVAL_FILES, DPO_TRAIN_FILES, find_data, load_policy_and_reference,
                                             parse_stage, saver)

    p = build_parser("dpo", __doc__.splitlines()[0])
    p.add_argument("--beta", type=float, help="strength of the implicit KL to the reference (default 0.1)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO: assumed rate of flipped labels")
    p.add_argument("--rpo-alpha", type=float, help="weight of the chosen answers' NLL added to the DPO loss (0: pure DPO)")
    p.add_argument("--eval-data", help="held-out pairs (default: DATA/eval/dpo.jsonl)")
    p.add_argument("--trainable", help="regex over parameter names: only matching parameters train (default: all)")
    args, _ = parse_stage(p, "dpo", argv)
    if not args.init:
        raise SystemExit("--init: DPO starts from an SFT checkpoint folder")
    model, ref, tokenizer, tok_dir = load_policy_and_reference(args.init)
    train = attach_reference(PreferenceDataset(find_data(args.data, *DPO_TRAIN_FILES), tokenizer, args.max_len), ref)

    from training.cli import config_from_args

    trainable = (lambda name, _p: re.search(args.trainable, name) is not None) if args.trainable else None
    trainer = Trainer(model, train, pair_collate, make_dpo_loss(args.beta, args.label_smoothing, args.rpo_alpha or 0.0), config_from_args(args),
                      count_fn=lambda b: b["n_pairs"], save_fn=saver(tok_dir), trainable=trainable)
    summary = trainer.train()
    eval_path = Path(args.eval_data) if args.eval_data else None
    if eval_path is None and Path(args.data).is_dir():
        eval_path = next((Path(args.data) / c for c in DPO_EVAL_FILES if (Path(args.data) / c).is_file()), None)
    if eval_path is not None:
        held = PreferenceDataset(eval_path, tokenizer, args.max_len)
        device = next(model.parameters()).device
        ref.to(device)
        summary |= {f"heldout_{k}": v for k, v in
                    preference_metrics(pair_logps(model, held, device=device), pair_logps(ref, held, device=device),
                                       args.beta).items()}
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))}, indent=2))
    return summary


if __name__ == "__main__":
    main()
