"""The Hugging Face integration end to end on tiny models built from configs (no downloads):
the loss function against transformers' own, the fused forward of each model family against the
unpatched model + MemFT loss (value and every gradient), peft LoRA (also on the lm_head), and a
Trainer run with gradient accumulation against the single-batch MemFT loss."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

from memft_kernels import memft_loss  # noqa: E402

from helpers import rel  # noqa: E402
from memft_kernels.integrations.transformers import (  # noqa: E402
    apply_memft_to_model,
    memft_causal_lm_loss,
    memft_compute_loss_func,
    unwrap_model,
    use_memft,
)

V = 97
# Weights vary between 0 and 1 at random init (p is near 1/V there), so MemFT differs from CE.
OPTIONS = dict(policy="sigmoid", threshold=1.0 / V, sharpness=10.0)


def tiny(family: str):
    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=V, max_position_embeddings=64, initializer_range=0.2,
    )
    t = transformers
    if family == "gpt2":
        config = t.GPT2Config(
            n_embd=32, n_layer=1, n_head=2, vocab_size=V, n_positions=64, initializer_range=0.2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        cls = t.GPT2LMHeadModel
    else:
        config, cls = {
            "llama": (lambda: t.LlamaConfig(**common), t.LlamaForCausalLM),
            "mistral": (lambda: t.MistralConfig(**common), t.MistralForCausalLM),
            "qwen2": (lambda: t.Qwen2Config(**common), t.Qwen2ForCausalLM),
            "qwen3": (lambda: t.Qwen3Config(**common, head_dim=16), t.Qwen3ForCausalLM),
            "gemma": (lambda: t.GemmaConfig(**common, head_dim=16), t.GemmaForCausalLM),
            "gemma2": (lambda: t.Gemma2Config(**common, head_dim=16, final_logit_softcapping=2.0), t.Gemma2ForCausalLM),
            "gemma3_text": (lambda: t.Gemma3TextConfig(**common, head_dim=16, final_logit_softcapping=3.0),
                            t.Gemma3ForCausalLM),
            # lm_head.weight is embed_tokens.weight: its gradient is the sum of both uses
            "llama-tied": (lambda: t.LlamaConfig(**common, tie_word_embeddings=True), t.LlamaForCausalLM),
            # logits = logit_scale * lm_head(h): use_memft only (apply_memft_to_model refuses the family)
            "cohere": (lambda: t.CohereConfig(**common, logit_scale=0.25, eos_token_id=None, bos_token_id=None,
                                              pad_token_id=None), t.CohereForCausalLM),
            "llama-bias": (lambda: t.LlamaConfig(**common), t.LlamaForCausalLM),
        }[family]
        config = config()
    torch.manual_seed(0)
    model = cls(config).train()
    if family == "llama-bias":  # an lm_head with a bias (a custom head): the loss must add it
        model.lm_head = torch.nn.Linear(32, V, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=1.0)
    return model


def batch(b=2, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    return ids, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, ref: dict, tol=2e-5):
    assert got.keys() == ref.keys() and got
    for name in ref:
        assert rel(got[name], ref[name]) < tol, name


# ---------------------------------------------------------------- the loss function


def test_causal_lm_loss_equals_transformers_without_policy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 9, V, generator=g)
    _, labels = batch()
    assert rel(memft_causal_lm_loss(logits, labels, V, policy="none"), ForCausalLMLoss(logits, labels, V)) < 1e-6
    n = torch.tensor(23)
    got = memft_causal_lm_loss(logits, labels, V, num_items_in_batch=n, policy="none")
    assert rel(got, ForCausalLMLoss(logits, labels, V, num_items_in_batch=n)) < 1e-6
    shift = labels.roll(-1, 1)
    got = memft_causal_lm_loss(logits, None, V, shift_labels=shift, policy="none")
    assert rel(got, ForCausalLMLoss(logits, None, V, shift_labels=shift)) < 1e-6


def test_causal_lm_loss_is_memft_of_shifted_logits():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 9, V, generator=g)
    _, labels = batch()
    got = memft_causal_lm_loss(logits, labels, V, output_attentions=False, **OPTIONS)  # model kwargs ignored
    ref = memft_loss(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), **OPTIONS)
    assert rel(got, ref) < 1e-6
    seen = []
    memft_causal_lm_loss(logits, labels, V, stats_callback=seen.append, **OPTIONS)
    assert seen[0].n_valid.item() == 14  # 2 * 8 shifted positions, labels 1 and 2 of row 0 ignored
    with pytest.raises(ValueError, match="vocab_size"):
        memft_causal_lm_loss(logits, labels, V + 1)
    with pytest.raises(TypeError, match="unknown MemFT option"):
        use_memft(tiny("llama"), polcy="hard")
    with pytest.raises(ValueError, match="threshold"):
        memft_compute_loss_func(threshold=2.0)


# ---------------------------------------------------------------- the fused forward, per family


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "llama-tied", "llama-bias", "gpt2"]


def own_logits_loss(model, ids, labels, denominator=None):
    """The reference: the model's own logits (softcapped by Gemma-2/3's forward), shifted here,
    memft_loss on them."""
    logits = model(input_ids=ids).logits
    return memft_loss(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), denominator=denominator, **OPTIONS)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_forward_matches_unpatched(family):
    model = tiny(family)
    reference = copy.deepcopy(model)
    ids, labels = batch()

    ref_loss = own_logits_loss(reference, ids, labels)
    ref_loss.backward()
    apply_memft_to_model(model, chunk_size=5, **OPTIONS)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None  # the fused path never built them
    out.loss.backward()
    assert rel(out.loss, ref_loss) < 1e-6
    assert_same_grads(grads(model), grads(reference))
    if family == "llama-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight

    # Evaluation and calls without labels run the model's own forward (with the MemFT loss).
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids, labels=labels)
        plain = model(input_ids=ids)
        assert evaluated.logits is not None and rel(evaluated.loss, ref_loss) < 1e-6
        assert torch.equal(plain.logits, reference.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "llama-tied", "gpt2", "cohere"])
def test_logits_paths_and_num_items_match_model_logits(family):
    """use_memft (the model's own forward) and memft_compute_loss_func (the Trainer's) with
    num_items_in_batch: the model's logits (capped by its own forward, never twice), shifted,
    over the given denominator."""
    n = torch.tensor(11)
    ids, labels = batch()
    reference = tiny(family)
    ref_loss = own_logits_loss(reference, ids, labels, denominator=n)
    ref_loss.backward()
    for way in ("use_memft", "compute_loss_func"):
        model = tiny(family)
        if way == "use_memft":
            loss = use_memft(model, **OPTIONS)(input_ids=ids, labels=labels, num_items_in_batch=n).loss
        else:
            loss = memft_compute_loss_func(**OPTIONS)(model(input_ids=ids), labels, num_items_in_batch=n)
        loss.backward()
        assert rel(loss, ref_loss) < 1e-6, way
        assert_same_grads(grads(model), grads(reference))


def test_unsupported_family_and_double_softcap():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=V)
    config.model_type = "cohere"  # a family that scales its logits: refused, not silently wrong
    with pytest.raises(ValueError, match="supports model types"):
        apply_memft_to_model(transformers.LlamaForCausalLM(config))
    with pytest.raises(ValueError, match="supports model types.*'cohere'"):
        apply_memft_to_model(peft.get_peft_model(tiny("cohere"), peft.LoraConfig(r=2, target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        apply_memft_to_model(tiny("gemma2"), softcap=5.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):  # its logits are capped already
        use_memft(peft.get_peft_model(tiny("gemma2"), peft.LoraConfig(r=2, target_modules=["q_proj"])), softcap=5.0)


def test_patched_model_copies_and_unpatches():
    model = apply_memft_to_model(tiny("llama"), **OPTIONS)
    clone = copy.deepcopy(model)  # the patch holds its model: the copy's holds the copy
    ids, labels = batch()
    out = clone(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in clone.parameters())
    apply_memft_to_model(model, fused_linear=False, **OPTIONS)  # back to the model's own forward
    assert model(input_ids=ids, labels=labels).logits is not None


@pytest.mark.parametrize("wrap", ["plain", "peft"])
def test_patched_model_saves_and_loads_whole(wrap, tmp_path):
    """torch.save of a whole patched model (and pickling, e.g. to a worker process) failed: the patch
    was a closure; a pickled bound method of the class forward would come back as the patch itself."""
    import inspect

    model = tiny("llama")
    if wrap == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model = apply_memft_to_model(model.train(), **OPTIONS)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    ids, labels = batch()
    want, got = model(input_ids=ids, labels=labels), loaded(input_ids=ids, labels=labels)
    assert want.logits is None and got.logits is None  # still patched
    assert float(got.loss) == float(want.loss)
    base = unwrap_model(loaded)
    assert base.forward.model is base and "labels" in inspect.signature(base.forward).parameters
    apply_memft_to_model(loaded, fused_linear=False, **OPTIONS)  # the saved original forward still runs
    out = loaded(input_ids=ids, labels=labels)
    assert out.logits is not None and rel(out.loss, want.loss) < 1e-5


def test_unknown_head_falls_back_to_logits():
    model = tiny("gemma2")
    reference = copy.deepcopy(model)
    model.lm_head = torch.nn.Sequential(model.lm_head)  # a head kind the fused path does not know
    ids, labels = batch()
    ref_loss = memft_causal_lm_loss(reference(input_ids=ids).logits, labels, **OPTIONS)
    apply_memft_to_model(model, **OPTIONS)
    with pytest.warns(UserWarning, match="materialized logits"):
        out = model(input_ids=ids, labels=labels)
    assert rel(out.loss, ref_loss) < 1e-6  # the model's softcap is still applied, once


# ---------------------------------------------------------------- peft


@pytest.mark.parametrize("head", ["frozen", "lora", "modules_to_save"])
def test_fused_forward_through_peft(head):
    base = tiny("qwen3")
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    if head == "lora":
        kwargs["target_modules"] = kwargs["target_modules"] + ["lm_head"]
    if head == "modules_to_save":
        kwargs["modules_to_save"] = ["lm_head"]
    model = peft.get_peft_model(base, peft.LoraConfig(**kwargs)).train()
    reference = copy.deepcopy(model)
    ids, labels = batch()

    torch.manual_seed(5)  # the same dropout masks in both runs: same random draws in the same order
    ref_loss = memft_causal_lm_loss(reference(input_ids=ids).logits, labels, **OPTIONS)
    ref_loss.backward()
    apply_memft_to_model(model, **OPTIONS)
    torch.manual_seed(5)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    assert rel(out.loss, ref_loss) < 1e-6
    got, ref = grads(model), grads(reference)
    assert_same_grads(got, ref)
    head_grads = [n for n in got if "lm_head" in n]
    assert bool(head_grads) == (head != "frozen")


# ---------------------------------------------------------------- Trainer with gradient accumulation


def _train_one_step(model, tmp_path, dataset, **trainer_kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        warmup_steps=0, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    transformers.Trainer(model=model, args=args, train_dataset=dataset, **trainer_kwargs).train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("way", ["fused", "compute_loss_func"])
def test_trainer_gradient_accumulation_equals_single_batch(way, tmp_path):
    ids, labels = batch(b=4, t=10, seed=7)
    labels[2, :6] = -100  # micro-batches with different numbers of trained tokens
    dataset = [{"input_ids": i, "labels": l, "attention_mask": torch.ones_like(i)} for i, l in zip(ids, labels)]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny("llama"), config)
    reference = copy.deepcopy(model).train()

    # One step with lr = 1 and plain SGD: the update is the gradient. Over the accumulated step the
    # Trainer's num_items_in_batch normalizes by all trained tokens, i.e. the "valid" normalization.
    ref_loss = memft_causal_lm_loss(reference(input_ids=ids).logits, labels, normalize="valid", **OPTIONS)
    ref_loss.backward()
    ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    if way == "fused":
        seen, head_calls = [], []
        apply_memft_to_model(model, stats_callback=seen.append, **OPTIONS)
        model.get_base_model().lm_head.register_forward_hook(lambda *a: head_calls.append(1))
        update = _train_one_step(model, tmp_path, dataset)
        assert len(seen) == 2 and not head_calls  # two micro-batches, the head never built logits
    else:
        update = _train_one_step(model, tmp_path, dataset, compute_loss_func=memft_compute_loss_func(**OPTIONS))
    assert update.keys() == ref.keys()
    for name in ref:
        assert rel(update[name], ref[name]) < 1e-4, name
