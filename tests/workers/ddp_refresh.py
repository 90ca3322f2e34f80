"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): train a few steps with different
data on each rank, refresh the prototypes, train on with the memory active, and save what each rank holds.

DDP runs with `find_unused_parameters=False` and gradient checkpointing (the HF Trainer's setting with gradient
checkpointing): the steps with an empty memory must not leave its parameters out of the graph."""

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
from conftest import random_batch, tiny_model  # noqa: E402

from modeling_fsgr_pma.training.steps import refresh_memory  # noqa: E402

output = sys.argv[1]
accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
assert accelerator.num_processes == 2, "launch with two processes (see tests/test_training.py)"
model = tiny_model(seed=0, memory_prior=True)
model.gradient_checkpointing_enable()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model, optimizer = accelerator.prepare(model, optimizer)
unwrapped = accelerator.unwrap_model(model)
model.train()
active = []
for step in range(5):
    if step == 3:
        refresh_memory(accelerator, unwrapped, seed=7, backend="auto")
    active.append(all(layer.memory_active for layer in unwrapped.memory_layers()))
    pixel_values, ids = random_batch(unwrapped.config, batch=4, length=9, seed=100 * accelerator.process_index + step)
    loss = model(pixel_values=pixel_values, input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
layer = unwrapped.memory_layers()[0]
torch.save(
    {
        "keys": layer.prototype_keys.clone(),
        "values": layer.prototype_values.clone(),
        "bank": layer.bank_contents()[0].clone(),
        "active": active,
        "params": {name: param.detach().clone() for name, param in unwrapped.named_parameters()},
    },
    f"{output}/rank{accelerator.process_index}.pt",
)
