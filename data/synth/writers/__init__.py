"""One writer per task. A writer is `write(world, scale, seed) -> {relative path: [rows]}`; rows of
the same path from several writers are concatenated (e.g. a future tool-use writer may add to
sft.jsonl). To add a task (rendered scenes, tool-use traces, ...), add a module and list it here."""
from data.synth.writers import evaluation, preference, pretrain, sft

WRITERS = [pretrain.write, sft.write, evaluation.write, preference.write]
