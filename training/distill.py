"""White-box knowledge distillation: `python -m training.distill --data WORLD_DIR --teacher BIG_DIR --out DIR`.

A small student learns from the SFT data and from a larger teacher that shares its tokenizer:
loss per response token = alpha * CE(student, label) + (1 - alpha) * T^2 * KL(teacher_T || student_T).
The T^2 keeps the soft term's gradient scale independent of T (Hinton et al. 2015). `--alpha 1`
is plain SFT of the same student, the baseline distillation must beat (the teacher is then unused).
The student is a new model `--student-scale` times narrower and shallower than the teacher
(`--student-layers` sets its depth) unless `--init` names one.
`--replay-pretrain R` mixes R pretrain documents per SFT sample into the data (both runs see the
same mix): on documents the teacher's soft labels carry what it knows of the world's facts.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from training.lm_stage import supervised_logits, supervised_positions
from training.trainer import LossOutput, Trainer
from vlm import MiniMindConfig, MiniMindForCausalLM


def kd_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                  alpha: float, temperature: float, reverse: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(loss_sum, ce_sum, kl_sum, n_tokens) over supervised positions; logits [..., V] already shifted.

    `reverse` uses KL(student_T || teacher_T), mode-seeking as in MiniLLM (Gu et al. 2023), for
    students too small to cover the teacher's modes. At tiny it did not pay (400 steps, T=1: EM 0.19,
    ppl 3.48 vs forward KL 0.195, 2.78), so forward stays the default."""
    keep = labels != -100
    s = student_logits[keep].float()
    y = labels[keep]
    ce = F.cross_entropy(s, y, reduction="sum")
    if teacher_logits is None or alpha >= 1.0:
        return ce, ce.detach(), torch.zeros(()), int(keep.sum())
    t = teacher_logits[keep].float()
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    if reverse:
        kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum()  # KL(student || teacher), summed over tokens
    else:
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()  # KL(teacher || student), summed over tokens
    loss = alpha * ce + (1 - alpha) * temperature ** 2 * kl
    return loss, ce.detach(), kl.detach(), int(keep.sum())


def make_kd_loss(teacher: MiniMindForCausalLM | None, alpha: float, temperature: float, reverse: bool = False):
    """The KD loss of a batch; both LM heads run on the supervised positions only (as in SFT), and a
    packed batch's `position_ids` keep its samples apart in student and teacher alike."""
    def loss_fn(model, batch: dict) -> LossOutput:
        ids, mask, pos = batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
        keep = supervised_positions(batch["labels"])
        hidden, _, aux = model.model(ids, mask, pos, keep=keep)
        logits, targets = supervised_logits(model, hidden, batch["labels"])
        t_logits = None
        if teacher is not None and alpha < 1.0:
            if next(teacher.parameters()).device != ids.device:
                teacher.to(ids.device)
            with torch.no_grad():
                t_logits = supervised_logits(teacher, teacher.model(ids, mask, pos, keep=keep)[0], batch["labels"])[0]
        loss, ce, kl, n = kd_loss_terms(logits, t_logits, targets, alpha, temperature, reverse)
        return LossOutput(loss_sum=loss, count=n, aux=aux,
                          metrics={"ce": ce.item() / max(n, 1), "kl": kl.item() / max(n, 1)})
    return loss_fn


def student_config(teacher_cfg: MiniMindConfig, scale: float = 0.5, layers: int | None = None) -> MiniMindConfig:
    """Teacher's vocabulary and heads layout, `scale` of its width and depth (0.5 -> ~1/4-1/8 the params);
    `layers` sets the depth instead (a narrow, deeper student)."""
    heads = max(2, int(teacher_cfg.num_attention_heads * scale) // 2 * 2)
    hidden = max(heads * 8, int(teacher_cfg.hidden_size * scale) // (2 * heads) * 2 * heads)  # RoPE: even head_dim
    return MiniMindConfig(vocab_size=teacher_cfg.vocab_size, hidden_size=hidden,
                          num_hidden_layers=layers or max(1, round(teacher_cfg.num_hidden_layers * scale)),
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          max_position_embeddings=teacher_cfg.max_position_embeddings,
                          rope_theta=teacher_cfg.rope_parameters["rope_theta"])


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def main(argv: list[str] | None = None) -> dict:
    from data.datasets import SFTDataset
    from training.cli import config_from_args
    from training.lm_stage import add_pack_args, build_parser, make_collate, with_pretrain_replay
    from training.posttrain_pipeline import load_init, parse_stage, saver, world_file

    p = build_parser("distill", __doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder (same tokenizer)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the hard-label CE (1 = SFT only; default 0.5, the tiny preset 0.2)")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T of both distributions")
    p.add_argument("--divergence", choices=("forward", "reverse"), default="forward",
                   help="KL(teacher||student) (Hinton) or KL(student||teacher) (mode-seeking)")
    p.add_argument("--student-scale", type=float, default=0.5,
                   help="student width/depth relative to the teacher (0.5 gives ~1/5 of the parameters at tiny)")
    p.add_argument("--student-layers", type=int, help="student depth (default: --student-scale of the teacher's)")
    add_pack_args(p)
    args, _ = parse_stage(p, "distill", argv)
    teacher, tokenizer, tok_dir = load_init(args.teacher)
    teacher.eval().requires_grad_(False)
    torch.manual_seed(args.seed)
    student = load_init(args.init)[0] if args.init else MiniMindForCausalLM(
        student_config(teacher.config, args.student_scale, args.student_layers))
    ratio = n_params(student) / n_params(teacher)
    print(f"[distill] student {n_params(student):,} params = {ratio:.3f} of the teacher's {n_params(teacher):,}")
    sft_file = world_file(args.data, "sft.jsonl")
    dataset = with_pretrain_replay(SFTDataset(sft_file, tokenizer, args.max_len), sft_file, tokenizer, args)
    loss_fn = make_kd_loss(teacher, args.alpha, args.temperature, reverse=args.divergence == "reverse")
    trainer = Trainer(student, dataset, make_collate(args), loss_fn, config_from_args(args), save_fn=saver(tok_dir))
    summary = trainer.train() | {"student_params": n_params(student), "teacher_params": n_params(teacher),
                                 "param_ratio": ratio}
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))}, indent=2))
    return summary


if __name__ == "__main__":
    main()
