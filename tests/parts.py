"""What each parameter of a GPT is, read from the module that holds it rather than from its
name, so that train_gpt.py's name-based rules (optimizer, storage, QAT, GPTQ) are checked against
the model."""
import torch

import train_gpt as tg


def parameter_roles(model: tg.GPT) -> dict[str, str]:
    """name -> "matrix" (a product's weight), "embedding" (a lookup table), "coda" (CoDA's angle,
    gate and learned norm) or "control" (every other gain, mix or scale)."""
    coda = {id(p) for block in model.blocks if block.attn.coda
            for p in (block.attn.coda_theta, *block.attn.coda_gate.parameters(),
                      block.attn.coda_norm)
            if p is not None}
    roles = {}
    for module_name, module in model.named_modules():
        for short, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{short}" if module_name else short
            if id(p) in coda:
                roles[name] = "coda"
            elif isinstance(module, torch.nn.Embedding):
                roles[name] = "embedding"
            elif isinstance(module, tg.CastedLinear) and short == "weight":
                roles[name] = "matrix"
            else:
                roles[name] = "control"
    assert set(roles) == {n for n, _ in model.named_parameters()}
    return roles


def of_role(model: tg.GPT, role: str) -> set[str]:
    return {name for name, r in parameter_roles(model).items() if r == role}
