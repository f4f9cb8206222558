"""The Trainer and TRL's SFTTrainer end to end on a tiny Llama (built from a config, no download):
one optimizer step over K micro-batches equals the gradient of ONE MemFT loss call over the whole
batch (the exact active mean, its fallback, gradient clipping on the final gradients), with logits
(use_memft) and fused (apply_memft_to_model); the recall metrics reach the Trainer's logs."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from memft_kernels import memft_loss  # noqa: E402
from memft_kernels.integrations.trainer import MemFTMetricsCallback, add_memft_to_trainer  # noqa: E402
from memft_kernels.integrations.transformers import memft_causal_lm_loss, memft_compute_loss_func  # noqa: E402

V = 97
ROWS, T = 4, 10


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tiny_llama(tied=False):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=V, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


def rows(seed=7, prompt=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (ROWS, T), generator=g)
    labels = ids.clone()
    if prompt:  # micro-batches with different numbers of trained tokens
        labels[0, :3] = -100
        labels[2, :6] = -100
    return ids, labels


def reference(model, ids, labels, **options):
    """Loss, stats and gradients of ONE memft_causal_lm_loss call over the whole batch."""
    ref = copy.deepcopy(model).train()
    seen = []
    loss = memft_causal_lm_loss(ref(input_ids=ids).logits, labels, stats_callback=seen.append, **options)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}
    return float(loss.detach()), seen[0], grads


def sgd_args(tmp_path, cls=None, **overrides):
    """One SGD step with lr = 1 over K = 4 micro-batches of one row: the update is the gradient."""
    cls = cls or transformers.TrainingArguments
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=ROWS, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        warmup_steps=0, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def updates(model, before):
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Recorder(transformers.TrainerCallback):
    """Stands for a report_to integration: what on_log hands it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


# Mixed: hard threshold 1/V makes about half the tokens active at init. All recalled: threshold
# 1e-6 makes every token "recalled" (p > 1e-6), so the whole step falls back to the plain mean.
CASES = {
    "mixed": dict(policy="hard", threshold=1.0 / V),
    "all_recalled": dict(policy="hard", threshold=1e-6),
    "sigmoid": dict(policy="sigmoid", threshold=1.0 / V),
}


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("case,clip", [("mixed", False), ("all_recalled", False), ("sigmoid", True)])
def test_trainer_step_is_one_active_mean_call(fused, case, clip, tmp_path):
    ids, labels = rows()
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), lora)
    ref_loss, ref_stats, ref = reference(model, ids, labels, **CASES[case])
    assert bool(ref_stats.fell_back) == (case == "all_recalled")
    norm = torch.cat([g.flatten() for g in ref.values()]).norm().item()
    max_norm = 0.5 * norm if clip else 0.0  # clipping halves the final gradient, not a partial sum
    dataset = [{"input_ids": i, "labels": l, "attention_mask": torch.ones_like(i)} for i, l in zip(ids, labels)]
    recorder = Recorder()
    trainer = transformers.Trainer(model=model, args=sgd_args(tmp_path, max_grad_norm=max_norm),
                                   train_dataset=dataset, callbacks=[recorder])
    add_memft_to_trainer(trainer, fused=fused, **CASES[case])
    before = snapshot(model)
    trainer.train()
    update = updates(model, before)
    assert update.keys() == ref.keys()
    factor = 0.5 if clip else 1.0
    for name in ref:
        assert rel(update[name], factor * ref[name]) < 1e-5, name
    log = recorder.logs[0]
    assert log["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert log["recalled_frac"] == pytest.approx(float(ref_stats.recalled_frac), abs=1e-6)
    assert log["token_accuracy"] == pytest.approx(float(ref_stats.token_accuracy), abs=1e-6)
    assert log["n_active"] == int(ref_stats.n_active)
    assert trainer.state.log_history[0]["recalled_frac"] == log["recalled_frac"]
    step = trainer.callback_handler.callbacks[1].last_step  # the accumulator's step, all micro-batches
    assert step["micro_batches"] == ROWS and step["fell_back"] == bool(ref_stats.fell_back)


class GradsAtStep(transformers.TrainerCallback):
    """Whether every trainable parameter has no gradient when the optimizer steps."""

    def __init__(self, model):
        self.params, self.none = [p for p in model.parameters() if p.requires_grad], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.none.append(all(p.grad is None for p in self.params))


@pytest.mark.parametrize("fallback", ["zero", "mean"])
def test_a_step_with_nothing_to_train_has_no_gradient(fallback, tmp_path):
    """Every token recalled with fallback="zero" (the authors' zero_bp): the optimizer sees no
    gradient (AdamW leaves the weights and moments alone; a zero gradient moves them by momentum)."""
    ids, labels = rows()
    model = tiny_llama()
    dataset = [{"input_ids": i, "labels": l, "attention_mask": torch.ones_like(i)} for i, l in zip(ids, labels)]
    trainer = transformers.Trainer(model=model, args=sgd_args(tmp_path), train_dataset=dataset)
    add_memft_to_trainer(trainer, **dict(CASES["all_recalled"], fallback=fallback))
    probe = GradsAtStep(model)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.none == [fallback == "zero"]


def test_calling_add_memft_to_trainer_again_replaces_the_first(tmp_path):
    ids, labels = rows()
    model = tiny_llama()
    dataset = [{"input_ids": i, "labels": l, "attention_mask": torch.ones_like(i)} for i, l in zip(ids, labels)]
    trainer = transformers.Trainer(model=model, args=sgd_args(tmp_path), train_dataset=dataset)
    add_memft_to_trainer(trainer, fused=True, **CASES["sigmoid"])
    add_memft_to_trainer(trainer, **CASES["mixed"])  # used to leave the first accumulator's callback in
    with torch.no_grad():  # and the fused forward (fused=False now); no grad: the accumulator is not touched
        assert model(input_ids=ids, labels=labels).logits is not None
    assert sum(isinstance(c, MemFTMetricsCallback) for c in trainer.callback_handler.callbacks) == 1
    scaled = trainer.loss_is_scaled_for_ga
    add_memft_to_trainer(trainer, exact_active_mean=False)  # the Trainer scales by the GA steps again
    assert not trainer.loss_is_scaled_for_ga and trainer.memft_accumulator is None
    add_memft_to_trainer(trainer, **CASES["mixed"])
    assert trainer.loss_is_scaled_for_ga == scaled
    ref_loss, ref_stats, _ = reference(model, ids, labels, **CASES["mixed"])
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert log["n_active"] == pytest.approx(float(ref_stats.n_active))


def test_metrics_callback_without_accumulation_and_not_counting_eval(tmp_path):
    """num_items_in_batch convention (no accumulator); lr = 0 so that one log over 2 steps covers
    the 4 rows of a fixed model; an evaluation before training must not be counted."""
    ids, labels = rows(seed=11)
    model = tiny_llama()
    options = dict(policy="hard", threshold=1.0 / V)
    _, stats, _ = reference(model, ids, labels, **options)
    dataset = [{"input_ids": i, "labels": l, "attention_mask": torch.ones_like(i)} for i, l in zip(ids, labels)]
    recorder = Recorder()
    args = sgd_args(tmp_path, gradient_accumulation_steps=2, max_steps=2, logging_steps=2, learning_rate=0.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset[:2],
                                   callbacks=[recorder])
    add_memft_to_trainer(trainer, exact_active_mean=False, **options)
    assert isinstance(trainer.callback_handler.callbacks[0], MemFTMetricsCallback)  # before every reporter
    trainer.evaluate()
    trainer.train()
    log = [entry for entry in recorder.logs if "loss" in entry][0]
    assert log["recalled_frac"] == pytest.approx(float(stats.recalled_frac), abs=1e-6)
    assert log["token_accuracy"] == pytest.approx(float(stats.token_accuracy), abs=1e-6)
    assert log["n_active"] == pytest.approx(int(stats.n_active) / 2)  # per optimizer step


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_evaluate_gives_the_per_call_memft_loss(fused, tmp_path):
    """trainer.evaluate()'s eval_loss with the default accumulator is the per-call MemFT loss (the
    active mean) of each eval batch. transformers 5 passes the batch's valid count as
    num_items_in_batch in evaluation too; it used to become the denominator (sum w l / n_valid:
    neither the MemFT loss nor cross-entropy)."""
    ids, labels = rows(seed=13)
    model = tiny_llama()
    options = dict(policy="hard", threshold=1.0 / V)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    halves = [memft_loss(logits[rows_].reshape(-1, V), shifted[rows_].reshape(-1), **options)
              for rows_ in (slice(0, 2), slice(2, 4))]
    plain = memft_loss(logits.reshape(-1, V), shifted.reshape(-1), policy="none")
    dataset = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    args = sgd_args(tmp_path, per_device_eval_batch_size=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    add_memft_to_trainer(trainer, fused=fused, **options)
    eval_loss = trainer.evaluate()["eval_loss"]
    expected = float(sum(halves)) / 2  # the Trainer averages the eval batches' losses (equal sizes)
    assert abs(eval_loss - expected) / expected < 1e-5
    assert abs(eval_loss - float(plain)) / float(plain) > 1e-2  # not cross-entropy


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_model_init_models_train_with_memft(fused, tmp_path):
    """Trainer(model_init=...) replaces trainer.model with a fresh model in train(): it used to lose
    the MemFT loss (the accumulator's first step failed: no micro-batch accumulated; without the
    accumulator, plain cross-entropy). The fresh model gets the same call: the step's update is the
    one-call gradient."""
    ids, labels = rows(seed=17)
    options = dict(policy="hard", threshold=1.0 / V)
    ref_loss, _, ref = reference(tiny_llama(), ids, labels, **options)
    made = []

    def model_init():
        made.append(tiny_llama())
        return made[-1]

    dataset = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    trainer = transformers.Trainer(model_init=model_init, args=sgd_args(tmp_path), train_dataset=dataset)
    add_memft_to_trainer(trainer, fused=fused, **options)
    add_memft_to_trainer(trainer, fused=fused, **options)  # a second call wraps the user's model_init once
    trainer.train()
    assert len(made) == 2 and trainer.model is made[-1]
    update = updates(made[-1], snapshot(tiny_llama()))
    for name in ref:
        assert rel(update[name], ref[name]) < 1e-5, name
    assert trainer.state.log_history[0]["loss"] == pytest.approx(ref_loss, rel=1e-5)


def test_trainer_without_accumulator_is_the_valid_normalization_even_without_accumulation(tmp_path):
    """What docs/INTEGRATIONS.md says: transformers 5's Trainer passes num_items_in_batch also with
    gradient_accumulation_steps=1 in one process, so use_memft / memft_compute_loss_func /
    exact_active_mean=False give sum w l / n_valid (normalize="valid"), not the active mean."""
    ids, labels = rows(seed=19)
    options = dict(policy="hard", threshold=1.0 / V)
    model = tiny_llama()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double().reshape(-1, V)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    valid = float(memft_loss(logits, shifted, normalize="valid", **options))
    active = float(memft_loss(logits, shifted, **options))
    assert abs(valid - active) / active > 1e-2
    dataset = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    args = sgd_args(tmp_path, gradient_accumulation_steps=1, per_device_train_batch_size=ROWS, learning_rate=0.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   compute_loss_func=memft_compute_loss_func(**options))
    trainer.train()
    assert abs(trainer.state.log_history[0]["loss"] - valid) / valid < 1e-5


def test_refusals(tmp_path):
    model = tiny_llama()
    trainer = transformers.Trainer(model=model, args=sgd_args(tmp_path), train_dataset=[],
                                   compute_loss_func=memft_compute_loss_func())
    with pytest.raises(ValueError, match="compute_loss_func"):
        add_memft_to_trainer(trainer)
    trainer = transformers.Trainer(model=model, args=sgd_args(tmp_path), train_dataset=[])
    with pytest.raises(ValueError, match="normalize"):
        add_memft_to_trainer(trainer, normalize="valid")
    # Without the accumulator the Trainer's num_items_in_batch makes it the 'valid' normalization: an
    # explicit normalize='active' used to be silently ignored.
    with pytest.raises(ValueError, match=r"normalize='active'.*exact_active_mean=True"):
        add_memft_to_trainer(trainer, exact_active_mean=False, normalize="active")
    # The Trainer's label smoother pops the labels and computes plain CE itself: MemFT never ran
    # (silently with exact_active_mean=False; an accumulator error at the first step otherwise).
    args = sgd_args(tmp_path, label_smoothing_factor=0.1)
    for exact in (False, True):
        trainer = transformers.Trainer(model=model, args=args, train_dataset=[])
        with pytest.raises(ValueError, match=r"label_smoothing_factor=0.1.*pass label_smoothing=0.1"):
            add_memft_to_trainer(trainer, exact_active_mean=exact)
    # DeepSpeed (ZeRO >= 2, or its stage unknown as here) keeps the micro-batches' gradients in its own
    # buffers; FSDP1 is not supported (the flags the Trainer sets from accelerate's state; a real
    # DeepSpeed Trainer: tests/test_integration_deepspeed.py)
    trainer = transformers.Trainer(model=model, args=sgd_args(tmp_path), train_dataset=[])
    trainer.is_deepspeed_enabled = True
    with pytest.raises(NotImplementedError, match=r"ZeRO stage \(unknown\).*own \(partitioned\) buffers"):
        add_memft_to_trainer(trainer)
    add_memft_to_trainer(trainer, exact_active_mean=False)  # the num_items_in_batch convention: allowed
    trainer = transformers.Trainer(model=model, args=sgd_args(tmp_path), train_dataset=[])
    trainer.is_fsdp_enabled = True
    with pytest.raises(NotImplementedError, match="FSDP version 1: only FSDP2"):
        add_memft_to_trainer(trainer)
    trainer = transformers.Trainer(model=model, args=sgd_args(tmp_path), train_dataset=[])
    trainer.args.use_liger_kernel = True  # Liger's forward computes its own CE (liger is not installed here)
    with pytest.raises(ValueError, match="use_liger_kernel"):
        add_memft_to_trainer(trainer)


# ---------------------------------------------------------------- TRL SFTTrainer


def _tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(V)}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        pad_token="t1", eos_token="t2", bos_token="t3",
    )


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_trl_sft_trainer_step_is_one_active_mean_call(fused, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from memft_kernels.integrations.trl import MemFTSFTTrainer

    ids, labels = rows(seed=5, prompt=False)  # SFT on whole sequences (TRL builds the labels)
    model = tiny_llama()
    options = dict(policy="hard", threshold=1.0 / V)
    ref_loss, ref_stats, ref = reference(model, ids, labels, **options)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    args = sgd_args(tmp_path, cls=trl.SFTConfig, dataset_num_proc=None, bf16=False)  # SFTConfig defaults to bf16
    trainer = MemFTSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer(),
                              memft=options, fused=fused)
    before = snapshot(model)
    trainer.train()
    update = updates(model, before)
    assert update.keys() == ref.keys()
    for name in ref:
        assert rel(update[name], ref[name]) < 1e-5, name
    log = trainer.state.log_history[0]
    assert log["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert log["recalled_frac"] == pytest.approx(float(ref_stats.recalled_frac), abs=1e-6)
    assert log["token_accuracy"] == pytest.approx(float(ref_stats.token_accuracy), abs=1e-6)
    assert log["n_active"] == int(ref_stats.n_active)


def test_trl_refuses_other_loss_types(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from memft_kernels.integrations.trl import MemFTSFTTrainer

    dataset = datasets.Dataset.from_dict({"input_ids": rows()[0].tolist()})
    args = sgd_args(tmp_path, cls=trl.SFTConfig, dataset_num_proc=None, loss_type="dft")
    with pytest.raises(ValueError, match="loss_type"):
        MemFTSFTTrainer(model=tiny_llama(), args=args, train_dataset=dataset, processing_class=_tokenizer())


def test_reference_is_memft_loss_on_shifted_labels():
    """The reference above is memft_loss over the whole batch with labels shifted by one."""
    ids, labels = rows()
    model = tiny_llama()
    logits = model(input_ids=ids).logits
    direct = memft_loss(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), policy="hard", threshold=1.0 / V)
    via = memft_causal_lm_loss(logits, labels, policy="hard", threshold=1.0 / V)
    assert float(direct) == pytest.approx(float(via), rel=1e-6)


# ---------------------------------------------------------------- Trainer under DDP: 2 gloo ranks


def _ddp_rows():
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(4, V, (8, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[5, :7] = -100
    return ids, labels


def _ddp_lora_model(tied=False, head=False):
    targets = ["q_proj", "v_proj"] + (["lm_head"] if head else [])
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(tiny_llama(tied), lora)


def _ddp_worker(rank, port, outdir, loss_kwargs=True):
    import os
    from pathlib import Path

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")  # loopback only
    torch.set_num_threads(1)
    ids, labels = _ddp_rows()
    model = _ddp_lora_model()
    if not loss_kwargs:  # as models that set accepts_loss_kwargs = False: the Trainer passes no
        model.get_base_model().accepts_loss_kwargs = False  # num_items_in_batch and does not scale the loss
    dataset = [{"input_ids": i, "labels": l, "attention_mask": torch.ones_like(i)} for i, l in zip(ids, labels)]
    trainer = transformers.Trainer(model=model, args=sgd_args(Path(outdir) / f"r{rank}"), train_dataset=dataset)
    assert trainer.model_accepts_loss_kwargs == loss_kwargs
    add_memft_to_trainer(trainer, policy="hard", threshold=1.0 / V)
    before = snapshot(model)
    trainer.train()
    torch.save(dict(update=updates(model, before), log=trainer.state.log_history[0], world=trainer.args.world_size,
                    step=trainer.memft_callbacks[1].last_step), f"{outdir}/rank{rank}.pt")


@pytest.mark.parametrize("loss_kwargs", [True, False], ids=["loss_kwargs", "no_loss_kwargs"])
def test_trainer_ddp_two_gloo_ranks_is_one_active_mean_call(loss_kwargs, tmp_path):
    """2 processes x 4 micro-batches of one row = the 8 rows of one step: DDP averages the gradients
    and the Trainer multiplies the loss by the process count (average_tokens_across_devices, only
    for a model that takes loss kwargs); the update is still the gradient of one call over all 8
    rows, on both ranks. A model with accepts_loss_kwargs=False used to get half the update."""
    from helpers import free_port, spawn_ranks

    spawn_ranks(_ddp_worker, 2, (free_port(), str(tmp_path), loss_kwargs), 240.0, "the 2-rank Trainer run")
    ids, labels = _ddp_rows()
    ref_loss, ref_stats, ref = reference(_ddp_lora_model(), ids, labels, policy="hard", threshold=1.0 / V)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["world"] == 2 and result["step"]["micro_batches"] == ROWS
        assert result["update"].keys() == ref.keys()
        for name in ref:
            assert rel(result["update"][name], ref[name]) < 1e-5, (rank, name)
        assert result["log"]["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert result["log"]["n_active"] == int(ref_stats.n_active)
        assert result["log"]["token_accuracy"] == pytest.approx(float(ref_stats.token_accuracy), abs=1e-6)


# ---------------------------------------------------------------- Trainer under FSDP2: 2 gloo ranks
#
# accelerate (1.15) drops the FSDP plugin when the processes run on CPUs: AcceleratorState turns a
# plugin into DistributedType.FSDP only for GPU-like process types (MULTI_CPU is not in its list),
# so TrainingArguments(fsdp=...) on a CPU silently trains with DDP. The workers below flip the state
# to FSDP right after accelerate built it; everything else -- accelerate's fsdp2_prepare_model
# (fully_shard of every LlamaDecoderLayer and of the root), its no_sync (set_requires_gradient_sync),
# the clipping of DTensor gradients, the Trainer's FSDP branches -- runs unchanged, on gloo. Each
# worker checks that the LoRA parameters really are sharded DTensors.

FSDP_T = 8
FSDP_THRESHOLD = 1.0 / V


def _accelerate_fsdp_on_cpu():
    import accelerate.state
    from accelerate.utils import DistributedType

    cls = accelerate.state.AcceleratorState
    if getattr(cls, "_memft_test_fsdp_on_cpu", False):
        return
    original = cls.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # as accelerate does (a later AcceleratorState() copies PartialState's type back)
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    cls.__init__ = init
    cls._memft_test_fsdp_on_cpu = True


def _fsdp_rows():
    """12 rows of 8 tokens, their labels chosen from the initial model's own predictions: "recalled"
    rows are labelled with the model's top token at every position (p > 1/V: weight 0 under the hard
    policy), "active" rows with its least likely one (p << 1/V), "mixed" rows half and half. With 2
    ranks x 1 row per micro-batch, in order: step 1 = micro-batches {0, 1} (all recalled: the plain-loss
    gradients the step's next micro-batch must drop) and {2, 3} (mixed + active); step 2 = rows 4-7, all
    recalled (the whole step falls back to the plain mean); step 3 = rows 8-11 (mixed)."""
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(4, V, (12, FSDP_T), generator=g)
    with torch.no_grad():
        logits = _ddp_lora_model()(input_ids=ids).logits  # the trained model at its start
    top, bottom = logits.argmax(-1), logits.argmin(-1)
    labels = torch.full_like(ids, -100)
    kinds = ["recalled"] * 2 + ["mixed", "active"] + ["recalled"] * 4 + ["mixed", "active", "mixed", "mixed"]
    for r, kind in enumerate(kinds):
        for t in range(1, FSDP_T):  # label t is predicted at position t - 1
            pick = top if kind == "recalled" or (kind == "mixed" and t % 2) else bottom
            labels[r, t] = pick[r, t - 1]
    return ids, labels


# name: (add_memft_to_trainer options, TrainingArguments overrides)
FSDP_CASES = {
    "ga1-logits": (dict(policy="hard", threshold=FSDP_THRESHOLD), dict(gradient_accumulation_steps=1, max_steps=3)),
    "ga1-fused-clip": (dict(policy="sigmoid", threshold=FSDP_THRESHOLD, fused=True),
                       dict(gradient_accumulation_steps=1, max_steps=3, max_grad_norm=0.5)),
    "ga2-logits": (dict(policy="hard", threshold=FSDP_THRESHOLD),
                   dict(gradient_accumulation_steps=2, max_steps=3, learning_rate=0.1)),
    "ga2-fused-clip": (dict(policy="hard", threshold=FSDP_THRESHOLD, fused=True),
                       dict(gradient_accumulation_steps=2, max_steps=3, max_grad_norm=0.5)),
    # the fused head with tied embeddings (accelerate groups the head with them), and LoRA on the head
    # (its adapters' gradients reduce-scattered by the hooks of the head's FSDP forward method)
    "ga1-fused-tied": (dict(policy="hard", threshold=FSDP_THRESHOLD, fused=True),
                       dict(gradient_accumulation_steps=1, max_steps=2), dict(tied=True)),
    "ga2-fused-lora-head": (dict(policy="hard", threshold=FSDP_THRESHOLD, fused=True),
                            dict(gradient_accumulation_steps=2, max_steps=2, learning_rate=0.1), dict(head=True)),
    # transformers' num_items_in_batch convention (no accumulator): FSDP2's own no_sync, unchanged
    "ga2-valid": (dict(policy="hard", threshold=FSDP_THRESHOLD, exact_active_mean=False),
                  dict(gradient_accumulation_steps=2, max_steps=3, learning_rate=0.1)),
    # every token recalled, fallback "zero": no gradient at all, so AdamW's weight decay must not
    # move the weights (a zero gradient would)
    "ga1-zero-adamw": (dict(policy="hard", threshold=1e-6, fallback="zero"),
                       dict(gradient_accumulation_steps=1, max_steps=2, optim="adamw_torch", weight_decay=0.1,
                            learning_rate=0.1)),
}


def _fsdp_case(name, outdir, fsdp):
    """One Trainer run of FSDP_CASES[name]: under FSDP2 on this process's rank (1 row per device),
    or in one process (2 rows per device, the same rows per micro-batch). Returns what is compared."""
    from torch.utils.data import SequentialSampler

    class InOrder(transformers.Trainer):  # the same rows in every step, in both runs
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    options, overrides, *model_options = FSDP_CASES[name]
    ids, labels = _fsdp_rows()
    model = _ddp_lora_model(**(model_options[0] if model_options else {}))
    dataset = [{"input_ids": i, "labels": l, "attention_mask": torch.ones_like(i)} for i, l in zip(ids, labels)]
    settings = dict(dict(learning_rate=0.5), **overrides)
    if fsdp:
        settings.update(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    else:
        settings.update(per_device_train_batch_size=2)
    before = snapshot(model)
    trainer = InOrder(model=model, args=sgd_args(outdir, **settings), train_dataset=dataset)
    add_memft_to_trainer(trainer, **options)
    trainer.train()
    after = {}
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            if fsdp:
                from torch.distributed.tensor import DTensor

                assert isinstance(p, DTensor), f"{n} is not sharded: FSDP did not run"
                p = p.full_tensor()
            after[n.replace("_fsdp_wrapped_module.", "")] = p.detach().clone()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return dict(update={n: before[n] - after[n] for n in before}, logs=logs, steps=trainer.state.global_step,
                is_fsdp=bool(trainer.is_fsdp_enabled), sync_each_batch_after=trainer.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False))


def _fsdp_worker(rank, port, outdir):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")  # loopback only
    torch.set_num_threads(1)
    _accelerate_fsdp_on_cpu()
    results = {name: _fsdp_case(name, f"{outdir}/{name}-r{rank}", fsdp=True) for name in FSDP_CASES}
    torch.save(results, f"{outdir}/fsdp-rank{rank}.pt")
    from helpers import leave_gloo_rank

    leave_gloo_rank()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    from helpers import free_port, rank_results, spawn_ranks

    outdir = tmp_path_factory.mktemp("trainer-fsdp")
    spawn_ranks(_fsdp_worker, 2, (free_port(), str(outdir)), 300.0, "the 2-rank FSDP Trainer runs")
    return rank_results(outdir, 2, "fsdp-rank{}.pt")


@pytest.mark.slow  # one 2-process launch for all the cases (~15 s on 2 cores)
@pytest.mark.parametrize("name", list(FSDP_CASES))
def test_trainer_fsdp2_two_gloo_ranks_equal_one_process(name, fsdp_results, tmp_path):
    """2 ranks x 1 row per micro-batch under FSDP2 = the same Trainer run in one process with 2 rows
    per micro-batch: the parameter update after every step, the logged loss, grad_norm and recall
    metrics (once per step, over both ranks), for gradient accumulation 1 and 2 (the exact active
    mean over the step's micro-batches and ranks, with its fallbacks), with logits and fused."""
    single = _fsdp_case(name, tmp_path / "single", fsdp=False)
    assert not single["is_fsdp"]
    n_active = [log["n_active"] for log in single["logs"]]
    if name == "ga1-logits":  # rows 0 and 1 (the ga2 cases' first micro-batch) have no active token
        assert n_active[0] == 0 < n_active[1]
    if name in ("ga2-logits", "ga2-fused-clip"):  # step 2 falls back entirely; steps 1 and 3 train active tokens
        assert n_active[1] == 0 < min(n_active[0], n_active[2])
    if name == "ga2-fused-lora-head":
        assert any("lm_head.lora_B" in n and u.norm() > 0 for n, u in single["update"].items())
    max_norm = FSDP_CASES[name][1].get("max_grad_norm", 0.0)
    if max_norm:  # clipping acts on every step (on the final gradients: the logged grad_norm is compared)
        assert all(log["grad_norm"] > max_norm for log in single["logs"])
    for rank, results in enumerate(fsdp_results):
        result = results[name]
        assert result["is_fsdp"] and result["steps"] == single["steps"]
        assert not result["sync_each_batch_after"]  # restored at the end of training
        assert result["update"].keys() == single["update"].keys()
        # float32: the ranks' gradients are summed by the reduce-scatter, one process sums both rows
        # in its matmuls (measured: max 1.7e-6 over the cases)
        for n, ref in single["update"].items():
            if name == "ga1-zero-adamw":
                assert torch.equal(result["update"][n], ref) and not ref.any(), (rank, n)
            else:
                assert rel(result["update"][n], ref) < 1e-5, (rank, n)
        assert len(result["logs"]) == len(single["logs"]) == single["steps"]
        for got, want in zip(result["logs"], single["logs"]):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
            for key in ("recalled_frac", "token_accuracy", "n_active"):
                assert got[key] == pytest.approx(want[key], abs=1e-6), key
