"""Tests of lce_torch.hf.patch on tiny, randomly initialized transformers causal LMs.

Each model is built from its config (no weights are downloaded); its loss and every
parameter's gradient with the patch are compared with the same model unpatched (transformers'
own logits + ForCausalLMLoss): in fp32 tightly, in bf16 against the fp32 model with the
unpatched bf16 model's own error as the scale. A 30-step training run with and without the
patch must give the same loss curve.

With a CUDA device the patch runs lce. Without one, the tests still run on the CPU with
lce_torch.linear_cross_entropy replaced by a PyTorch reference (materialized logits): that
checks the patch's wiring (shift, ignore_index, softcap, num_items_in_batch, the output), not
lce's kernels. Needs transformers (tests/requirements-hf.txt pins the tested version).
"""

import importlib
import math

import pytest
import torch

import lce_standin
from lce_standin import ON_GPU

transformers = pytest.importorskip("transformers")

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


lce_torch = lce_standin.load()
hf = importlib.import_module("lce_torch.hf")

VOCAB = 503  # prime: no tile divides it
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {  # name: (config class, model class, config overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def make_model(family, dtype=torch.float32, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    options = dict(COMMON, **extra)
    options.update(overrides)
    config = getattr(transformers, config_name)(**options)
    config._attn_implementation = "eager"  # one attention path for both runs
    model = getattr(transformers, model_name)(config)
    return model.to(device=DEVICE, dtype=dtype)


def make_batch(batch=2, seq=24, ignore_fraction=0.15):
    ids = torch.randint(3, VOCAB, (batch, seq), device=DEVICE)
    labels = ids.clone()
    labels[torch.rand(labels.shape, device=DEVICE) < ignore_fraction] = -100
    return ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return out, out.loss.detach(), grads


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def patched_copy(model, **options):
    import copy

    twin = copy.deepcopy(model)
    return hf.patch(twin, **options)


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_matches_unpatched(family, seed):
    model = make_model(family).train()
    lce_model = patched_copy(model)
    ids, labels = make_batch()
    ref_out, ref_loss, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    out, loss, grads = loss_and_grads(lce_model, input_ids=ids, labels=labels)
    context = f"[{family}, seed {seed}]"
    assert out.logits is None, f"the patched training forward made logits {context}"
    assert ref_out.logits is not None
    assert loss.dtype == torch.float32
    assert rel(loss, ref_loss) <= 1e-5, f"loss {loss.item()} vs {ref_loss.item()} {context}"
    assert grads.keys() == ref_grads.keys(), context
    for name, g in grads.items():
        error = rel(g, ref_grads[name])
        assert error <= 1e-4, f"{name}: relative error {error:.2e} {context}"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_bf16_within_bf16_error(family, seed):
    """bf16: the patched and the unpatched bf16 models against the fp32 model with the same
    weights; the patched one may not be much worse (it is usually better: no bf16 logits)."""
    reference = make_model(family).train()
    ids, labels = make_batch(batch=4, seq=32)
    _, ref_loss, ref_grads = loss_and_grads(reference, input_ids=ids, labels=labels)
    plain = make_model(family, torch.bfloat16).train()
    plain.load_state_dict(reference.state_dict())
    lce_model = patched_copy(plain)
    _, plain_loss, plain_grads = loss_and_grads(plain, input_ids=ids, labels=labels)
    _, loss, grads = loss_and_grads(lce_model, input_ids=ids, labels=labels)
    context = f"[{family}, seed {seed}]"
    plain_error = rel(plain_loss, ref_loss)
    assert rel(loss, ref_loss) <= max(2 * plain_error, 4e-3), context
    for name, g in grads.items():
        scale = rel(plain_grads[name], ref_grads[name])
        error = rel(g, ref_grads[name])
        assert error <= max(2 * scale, 2e-2), (
            f"{name}: relative error {error:.2e}, unpatched bf16 {scale:.2e} {context}")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_softcap_is_the_models(family, seed):
    """A softcap that bites (logits scaled up, cap 2): the patch must apply the model's."""
    model = make_model(family, final_logit_softcapping=2.0).train()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    lce_model = patched_copy(model)
    ids, labels = make_batch()
    _, ref_loss, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    _, loss, grads = loss_and_grads(lce_model, input_ids=ids, labels=labels)
    assert rel(loss, ref_loss) <= 1e-5, f"[{family}, seed {seed}]"
    for name, g in grads.items():
        assert rel(g, ref_grads[name]) <= 1e-4, f"{name} [{family}, seed {seed}]"
    uncapped = make_model(family, final_logit_softcapping=None).train()
    uncapped.load_state_dict(model.state_dict())
    _, uncapped_loss, _ = loss_and_grads(hf.patch(uncapped), input_ids=ids, labels=labels)
    assert abs(uncapped_loss.item() - loss.item()) > 1e-2 * abs(loss.item()), \
        "the cap did not change the loss: the test does not exercise it"


@pytest.mark.parametrize("how", ["num_items_in_batch", "num_items_int", "ignore_index",
                                 "shift_labels", "return_tuple", "attention_mask"])
def test_loss_kwargs(how, seed):
    model = make_model("llama").train()
    lce_model = patched_copy(model)
    ids, labels = make_batch(batch=3, seq=20)
    inputs = dict(input_ids=ids, labels=labels)
    if how == "num_items_in_batch":  # gradient accumulation: sum / items of all micro-batches
        inputs["num_items_in_batch"] = torch.tensor(97, device=DEVICE)
    elif how == "num_items_int":
        inputs["num_items_in_batch"] = 97
    elif how == "ignore_index":
        labels[labels == -100] = 7
        inputs["ignore_index"] = 7
    elif how == "shift_labels":  # context parallelism passes pre-shifted labels
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        inputs["shift_labels"] = shifted[:, torch.randperm(shifted.shape[1])]
    elif how == "attention_mask":
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0
        inputs["attention_mask"] = mask
    if how == "return_tuple":
        ref = model(**inputs, return_dict=False)
        got = lce_model(**inputs, return_dict=False)
        assert isinstance(got, tuple) and isinstance(ref, tuple)
        assert rel(got[0], ref[0]) <= 1e-5
        return
    _, ref_loss, ref_grads = loss_and_grads(model, **inputs)
    _, loss, grads = loss_and_grads(lce_model, **inputs)
    assert rel(loss, ref_loss) <= 1e-5, f"[{how}, seed {seed}] {loss.item()} {ref_loss.item()}"
    for name, g in grads.items():
        assert rel(g, ref_grads[name]) <= 1e-4, f"{name} [{how}, seed {seed}]"


def test_plain_path_when_logits_are_wanted(seed):
    model = make_model("qwen2")
    lce_model = patched_copy(model)
    ids, labels = make_batch()
    with torch.no_grad():
        model.eval(), lce_model.eval()
        ref = model(input_ids=ids, labels=labels)
        got = lce_model(input_ids=ids, labels=labels)  # eval: the plain forward
        assert got.logits is not None and torch.equal(got.logits, ref.logits)
        assert torch.equal(got.loss, ref.loss)
        no_labels = lce_model(input_ids=ids)
        assert no_labels.loss is None and no_labels.logits.shape == (*ids.shape, VOCAB)
        forced = lce_model(input_ids=ids, labels=labels, skip_logits=True)
        assert forced.logits is None and rel(forced.loss, ref.loss) <= 1e-5
        kept = lce_model(input_ids=ids, logits_to_keep=1)
        assert kept.logits.shape == (ids.shape[0], 1, VOCAB)
    lce_model.train()
    trained = lce_model(input_ids=ids, labels=labels, skip_logits=False)
    assert trained.logits is not None
    hf.patch(lce_model, in_eval=True).eval()
    with torch.no_grad():
        assert lce_model(input_ids=ids, labels=labels).logits is None


def test_patch_errors_and_unpatch():
    model = make_model("llama")
    with pytest.raises(TypeError, match="not supported"):
        hf.patch(model.model)  # the decoder alone
    with pytest.raises(TypeError, match="option"):
        hf.patch(model, softcap=3.0)  # the model owns the softcap
    with pytest.raises(TypeError, match="option"):
        hf.patch(model, reduction="sum")

    class Custom(type(model)):
        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            return super().forward(*args, **kwargs)

    custom = Custom(model.config)
    with pytest.raises(TypeError, match="overrides the forward"):
        hf.patch(custom)
    other = make_model("llama")
    other.loss_function = lambda *a, **k: 0.0
    with pytest.raises(TypeError, match="loss_function"):
        hf.patch(other)
    with pytest.raises(TypeError, match="not supported"):
        hf.patch(torch.nn.Linear(4, 4))

    hf.patch(model, strategy="vocab_chunked")
    assert hf.is_patched(model) and "forward" in model.__dict__
    hf.patch(model)  # again: replaces the options
    hf.unpatch(model)
    assert not hf.is_patched(model)
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    ids, labels = make_batch()
    assert model.train()(input_ids=ids, labels=labels).logits is not None


def test_tied_embeddings_get_one_gradient(seed):
    model = make_model("gemma", tie_word_embeddings=True).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lce_model = patched_copy(model)
    assert lce_model.lm_head.weight is lce_model.model.embed_tokens.weight
    ids, labels = make_batch()
    _, ref_loss, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    _, loss, grads = loss_and_grads(lce_model, input_ids=ids, labels=labels)
    name = "model.embed_tokens.weight"
    assert rel(grads[name], ref_grads[name]) <= 1e-4


def counting_batch(batch=4, seq=32):
    """Sequences that count up from a random start (mod V): learnable in a few steps."""
    start = torch.randint(3, VOCAB, (batch, 1), device=DEVICE)
    ids = 3 + (start - 3 + torch.arange(seq, device=DEVICE)) % (VOCAB - 3)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt that is not scored
    return ids, labels


def train(model, batches, lr=3e-3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for ids, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_curves_match(family, dtype, seed):
    """30 AdamW steps on the same batches, with and without the patch."""
    if dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("bf16 training on the CPU stand-in checks nothing the fp32 run does not")
    model = make_model(family, dtype).train()
    lce_model = patched_copy(model)
    batches = [counting_batch() for _ in range(30)]
    plain = train(model, batches)
    fused = train(lce_model, batches)
    drop = plain[0] - min(plain)
    assert drop > 0.1 * plain[0], f"the plain run did not learn: {plain[0]} -> {min(plain)}"
    tolerance = 2e-3 if dtype == torch.float32 else 3e-2
    worst = max(abs(a - b) / abs(a) for a, b in zip(plain, fused))
    assert worst <= tolerance, (
        f"[{family}, seed {seed}] loss curves differ by {worst:.2e}: "
        f"plain {plain[::10]}, lce {fused[::10]}")
    assert all(math.isfinite(v) for v in fused)
