"""fusedops inside Hugging Face transformers (fusedops.hf): attn_implementation="fusedops" and patch_loss, checked
against transformers' own sdpa attention and loss on tiny randomly initialized models built from configs (no
downloads). Skipped when transformers is not installed."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import fusedops  # noqa: E402
import fusedops.hf as fhf  # noqa: E402
from conftest import backend_params, device_for  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

VOCAB, BATCH, SEQ = 97, 3, 12


def _cases():
    """(backend, dtype): float64 where it runs (the CPU kernels), float32 on every backend."""
    cases = []
    for p in backend_params():
        (backend,) = p.values
        for dtype in ((torch.float64, torch.float32) if backend == "cpu" else (torch.float32,)):
            cases.append(pytest.param(backend, dtype, id=f"{p.id}-{str(dtype)[6:]}", marks=p.marks))
    return cases


def _tol(dtype) -> float:
    """Relative to the compared tensor's scale; about 20x the differences seen on the CPU backends."""
    return 1e-12 if dtype == torch.float64 else 3e-5


def _hf_loss_tol(dtype) -> float:
    """For comparisons with transformers' own loss, which it computes in float32 whatever the model's dtype."""
    return max(_tol(dtype), 1e-6)


def _config(**overrides) -> LlamaConfig:
    # GQA (4 query heads on 2 key/value heads), head dim 16. initializer_range well above the default 0.02: with
    # tiny weights every attention score is ~0, the softmax ~uniform, and mistakes in the scores barely show.
    opts = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0)
    opts.update(overrides)
    return LlamaConfig(**opts)


def _model(config, attn_implementation: str, dtype, device, state=None):
    # from_config writes attn_implementation into the config it is given: each model gets its own copy.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn_implementation,
                                             dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device)


def _batch(device, padded: bool):
    """input_ids, attention_mask (left padding in rows 1 and 2 when padded, else None) and labels (-100 on the
    padding and on a few random tokens)."""
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    labels = ids.clone()
    labels[torch.rand(BATCH, SEQ) < 0.2] = -100
    mask = None
    if padded:
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, :4] = 0
        mask[2, :1] = 0
        ids[mask == 0] = 0
        labels[mask == 0] = -100
        mask = mask.to(device)
    return ids.to(device), mask, labels.to(device)


def _reference_loss(logits, labels, num_items_in_batch=None):
    """transformers' ForCausalLMLoss in the logits' own dtype (it computes in float32, which would cap a float64
    comparison at float32 precision). The tests check this against transformers' loss too."""
    target = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, target, ignore_index=-100)
    return F.cross_entropy(flat, target, ignore_index=-100, reduction="sum") / num_items_in_batch


def _close(got, expected, tol, what):
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(got, expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def _compare_grads(model, ref, tol):
    grads = dict(ref.named_parameters())
    compared = 0
    for name, p in model.named_parameters():
        expected = grads[name].grad
        assert p.grad is not None and expected is not None, name
        assert expected.abs().max() > 0, f"{name}: zero gradient, nothing compared"
        _close(p.grad, expected, 10 * _tol(p.dtype), name)
        compared += 1
    assert compared == len(grads)


@pytest.fixture(autouse=True)
def _registered():
    assert fhf.register() == "fusedops"


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: intra-op threads only add synchronization, which costs milliseconds per op when
    the test workers (-n 2) oversubscribe the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- attention -----------------------------------------------------------------------------------------------

def test_register_is_idempotent_and_lazy():
    assert fhf.register() == fhf.register() == "fusedops"
    assert transformers.AttentionInterface._global_mapping["fusedops"] is fhf.fusedops_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert AttentionMaskInterface._global_mapping["fusedops"] is sdpa_mask
    import subprocess
    import sys

    code = "import sys, fusedops; assert 'transformers' not in sys.modules and 'fusedops.hf' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left-padded"])
@pytest.mark.parametrize("backend,dtype", _cases())
def test_attention_matches_sdpa(backend, dtype, padded, monkeypatch):
    device = device_for(backend)
    config = _config()
    with fusedops.backend(backend):
        ref = _model(config, "sdpa", dtype, device)
        model = _model(config, "fusedops", dtype, device, state=ref.state_dict())
        assert model.config._attn_implementation == "fusedops" and ref.config._attn_implementation == "sdpa"
        ids, mask, labels = _batch(device, padded)

        calls = []

        def spy(*args, **kwargs):
            calls.append(1)
            return fhf.fusedops_attention_forward(*args, **kwargs)

        monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "fusedops", spy)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
        assert len(calls) == config.num_hidden_layers

        # Left-padding positions see no key at all: ours returns 0 there, torch's kernels 0 or NaN. Only the real
        # tokens' logits mean anything; the padding ones do not reach the loss.
        keep = torch.ones(BATCH, SEQ, dtype=torch.bool, device=device) if mask is None else mask.bool()
        _close(out.logits[keep], expected.logits[keep], _tol(dtype), "logits")
        _close(out.loss, expected.loss, _hf_loss_tol(dtype), "transformers' loss")
        loss, ref_loss = _reference_loss(out.logits, labels), _reference_loss(expected.logits, labels)
        _close(ref_loss, expected.loss.to(dtype), _hf_loss_tol(dtype), "reference loss")
        _close(loss, ref_loss, _tol(dtype), "loss")
        loss.backward()
        ref_loss.backward()
        _compare_grads(model, ref, _tol(dtype))


@pytest.mark.parametrize("backend,dtype", _cases())
def test_generate_with_cache_matches_sdpa(backend, dtype):
    """Decoding: one query token against the cache (no causal flag), with and without a padding mask."""
    device = device_for(backend)
    config = _config()
    with fusedops.backend(backend):
        ref = _model(config, "sdpa", dtype, device)
        model = _model(config, "fusedops", dtype, device, state=ref.state_dict())
        ids, mask, _ = _batch(device, padded=True)
        opts = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=0)
        for m in (mask, None):
            got = model.generate(ids, attention_mask=m, **opts)
            want = ref.generate(ids, attention_mask=m, **opts)
            assert torch.equal(got.sequences, want.sequences)
            for step, (a, b) in enumerate(zip(got.logits, want.logits)):
                _close(a, b, _tol(dtype), f"step {step} logits")


# ---- loss ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_items", [None, 17], ids=["mean", "num_items_in_batch"])
@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
@pytest.mark.parametrize("backend,dtype", _cases())
def test_patch_loss_matches_transformers(backend, dtype, linear, num_items):
    device = device_for(backend)
    config = _config(tie_word_embeddings=True)  # the lm_head weight is the embedding: its gradient has two terms
    with fusedops.backend(backend):
        ref = _model(config, "sdpa", dtype, device)
        model = _model(config, "sdpa", dtype, device, state=ref.state_dict())
        assert model.lm_head.weight is model.model.embed_tokens.weight
        ids, mask, labels = _batch(device, padded=True)
        kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items, device=device)}

        assert fhf.patch_loss(model, linear=linear) is model and fhf.is_loss_patched(model)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
        if linear:
            assert out.logits is None and model.loss_function is fhf.linear_causal_lm_loss
        else:
            assert model.loss_function is fhf.causal_lm_loss
            _close(out.logits, expected.logits, 0.0, "logits")
        assert out.loss.dtype == dtype and out.loss.grad_fn is not None

        ref_loss = _reference_loss(expected.logits, labels, num_items)
        _close(ref_loss, expected.loss.to(dtype), _hf_loss_tol(dtype), "reference loss")
        _close(out.loss, ref_loss, _tol(dtype), "loss")
        out.loss.backward()
        ref_loss.backward()
        _compare_grads(model, ref, _tol(dtype))


def test_patch_loss_outputs_and_unpatch():
    config = _config()
    model = _model(config, "fusedops", torch.float64, "cpu")
    ids, mask, labels = _batch("cpu", padded=True)
    stock_forward, stock_head_forward = model.forward, model.lm_head.forward
    expected = model(ids, mask, labels=labels)

    fhf.patch_loss(model)
    # Without labels the model runs unchanged (logits, no loss).
    plain = model(ids, attention_mask=mask)
    assert plain.loss is None
    _close(plain.logits, expected.logits, 0.0, "logits without labels")
    # labels passed positionally, a tuple output, keep_logits.
    loss, *_ = model(ids, mask, None, None, None, labels, return_dict=False)
    _close(loss, expected.loss.double(), _hf_loss_tol(torch.float64), "positional labels")
    fhf.patch_loss(model, keep_logits=True)
    out = model(ids, attention_mask=mask, labels=labels)
    _close(out.logits, expected.logits, 0.0, "kept logits")
    assert out.loss.grad_fn.name() == loss.grad_fn.name() != expected.loss.grad_fn.name()

    # A deep copy (a reference model, an EMA) is patched too, and runs on its own weights.
    twin = copy.deepcopy(model)
    assert fhf.is_loss_patched(twin)
    out = twin(ids, attention_mask=mask, labels=labels)
    assert out.loss.grad_fn.name() == loss.grad_fn.name()
    out.loss.backward()
    assert twin.lm_head.weight.grad is not None and all(p.grad is None for p in model.parameters())
    fhf.unpatch_loss(twin)
    assert twin.forward.__self__ is twin and twin.lm_head.forward.__self__ is twin.lm_head

    fhf.unpatch_loss(model)
    assert not fhf.is_loss_patched(model)
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert model.forward == stock_forward and model.lm_head.forward == stock_head_forward
    fhf.patch_loss(model, linear=False)
    fhf.unpatch_loss(model)
    assert model.loss_function is ForCausalLMLoss
    out = model(ids, attention_mask=mask, labels=labels)
    assert torch.equal(out.loss, expected.loss) and torch.equal(out.logits, expected.logits)
    fhf.unpatch_loss(model)  # a no-op when not patched


def test_patch_loss_fuses_final_logit_softcapping():
    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=64,
                          initializer_range=0.2, attn_logit_softcapping=None, final_logit_softcapping=2.0,
                          pad_token_id=0)
    ref = _model(config, "fusedops", torch.float64, "cpu")
    model = _model(config, "fusedops", torch.float64, "cpu", state=ref.state_dict())
    ids, mask, labels = _batch("cpu", padded=True)
    fhf.patch_loss(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert expected.logits.abs().max() < 2.0  # the capping is in effect
    ref_loss = _reference_loss(expected.logits, labels)
    _close(out.loss, ref_loss, _tol(torch.float64), "loss")
    out.loss.backward()
    ref_loss.backward()
    _compare_grads(model, ref, _tol(torch.float64))


def test_patch_loss_keeps_the_models_own_additions():
    """An MoE model adds its router's auxiliary loss to the language-model loss: that stays."""
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                           num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                           router_aux_loss_coef=0.1, initializer_range=0.2, pad_token_id=0)
    # float32: the experts' grouped matmul has no float64 kernel.
    ref = _model(config, "fusedops", torch.float32, "cpu")
    model = _model(config, "fusedops", torch.float32, "cpu", state=ref.state_dict())
    ids, mask, labels = _batch("cpu", padded=True)
    fhf.patch_loss(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
    aux = config.router_aux_loss_coef * expected.aux_loss
    assert aux > 1e-3
    tol = _tol(torch.float32)
    _close(out.aux_loss, expected.aux_loss, tol, "aux loss")
    _close(out.loss, _reference_loss(expected.logits, labels) + aux, tol, "loss")
    _close(out.loss, expected.loss, tol, "transformers' loss")
    out.loss.backward()
    expected.loss.backward()
    _compare_grads(model, ref, tol)


class ScaledLlamaForCausalLM(LlamaForCausalLM):
    """A causal LM the fused linear loss cannot follow: it changes its logits after the lm_head, or (when
    own_loss) computes its loss itself instead of with loss_function."""

    own_loss = False

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = 2 * self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        loss = None
        if labels is not None:
            if self.own_loss:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            else:
                loss = self.loss_function(logits, labels, self.config.vocab_size)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def test_patch_loss_refuses_what_it_cannot_reproduce():
    model = ScaledLlamaForCausalLM(_config())
    ids, _, labels = _batch("cpu", padded=False)
    expected = model(ids, labels=labels).loss
    fhf.patch_loss(model)
    with pytest.raises(RuntimeError, match="transforms its logits"):
        model(ids, labels=labels)
    fhf.patch_loss(model, linear=False)  # fine on the logits
    _close(model(ids, labels=labels).loss, expected, _tol(torch.float32), "loss")

    model.own_loss = True
    fhf.patch_loss(model)
    with pytest.raises(RuntimeError, match="failed after its lm_head returned the empty placeholder"):
        model(ids, labels=labels)
    fhf.patch_loss(model, keep_logits=True)
    with pytest.raises(RuntimeError, match="did not compute its loss"):
        model(ids, labels=labels)
    fhf.unpatch_loss(model)

    classifier = transformers.LlamaForSequenceClassification(_config(num_labels=3))
    with pytest.raises(ValueError, match="causal LM"):
        fhf.patch_loss(classifier)
    assert not fhf.is_loss_patched(classifier)
