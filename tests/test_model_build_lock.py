"""Models built and loaded from several threads at once (concurrent categorize runs in one process, engines
opened beside one another, a study's runs in threads). transformers builds every model inside save-and-restore
patches of process-wide state (tests/transformers_patches.py); two threads doing it at once restore each other's
patches, and a tied-embedding model then keeps ``lm_head`` on the meta device, in that load and in every later
one. knowcat builds and loads under one lock, ``probes.loading.MODEL_BUILD_LOCK``."""

import threading

import torch

from transformers_patches import leftovers, restore, snapshot


def _save_tied_model(path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.get_input_embeddings().weight.detach().clone()


def _problems(model) -> list[str]:
    out = [f"{n} on the meta device" for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if head is not emb:
        out.append("lm_head not tied to the input embeddings")
    if not out and not all(torch.isfinite(p).all() for p in model.parameters()):
        out.append("non-finite weights")
    return out


def test_models_built_and_loaded_from_several_threads_are_tied_and_whole(tmp_path, tiny_tokenizer):
    from knowcat.world.pretrain import PretrainConfig, build_model
    from probes.loading import load_model

    saved = _save_tied_model(tmp_path / "tied", tiny_tokenizer)
    small = PretrainConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    before = snapshot()
    n_threads, rounds = 4, 4
    start = threading.Barrier(n_threads)
    found, errors = [], []

    def work(i):
        try:
            start.wait()
            for r in range(rounds):
                if (i + r) % 2:
                    model = build_model(small, tiny_tokenizer)  # a new model, as pretraining builds it
                else:
                    model, _ = load_model(str(tmp_path / "tied"), device="cpu", dtype="float32")
                    if not torch.equal(model.get_output_embeddings().weight, saved):
                        found.append(f"thread {i} round {r}: lm_head is not the saved embedding matrix")
                found.extend(f"thread {i} round {r}: {p}" for p in _problems(model))
        except Exception as err:  # reported below: a failed load is a finding, not a crashed thread
            errors.append(f"thread {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    left = leftovers(before)
    restore(before, left)  # so that a failure here does not poison the tests after it
    assert not errors, errors[:4]
    assert not found, found[:4]
    assert not left, f"patches left in place after the threads ended: {left}"
    # and a load afterwards, alone, is whole too
    model, _ = load_model(str(tmp_path / "tied"), device="cpu", dtype="float32")
    assert not _problems(model)


def test_the_leak_check_sees_each_patch_left_in_place_and_restores_it():
    from transformers import initialization as init
    from transformers.modeling_utils import PreTrainedModel, local_torch_dtype

    # the patches of the installed transformers (5.0 has the first two; later 5.x added the others)
    patches = {"torch.nn.init.normal_": init.guard_torch_init_functions(),
               "torch default dtype": local_torch_dtype(torch.float64)}
    if hasattr(init, "no_tie_weights"):
        patches["PreTrainedModel.tie_weights"] = init.no_tie_weights()
    if hasattr(init, "meta_device_safe_creation_ops"):
        patches["torch.linspace"] = init.meta_device_safe_creation_ops()
    original_tie = PreTrainedModel.tie_weights
    for name, cm in patches.items():
        before = snapshot()
        assert not leftovers(before)
        cm.__enter__()
        try:
            left = leftovers(before)
            assert name in left, (name, left)
            # what the check finds is what a later load would inherit
            if name == "PreTrainedModel.tie_weights":
                assert PreTrainedModel.tie_weights is not original_tie
        finally:
            cm.__exit__(None, None, None)
        assert not leftovers(before), name
    # a patch never undone (the race's outcome): found without a snapshot from before, and put back
    before = snapshot()
    original_normal = torch.nn.init.normal_
    cm = init.guard_torch_init_functions()
    cm.__enter__()
    assert "torch.nn.init.normal_" in leftovers()
    restore(before, leftovers(before))
    assert torch.nn.init.normal_ is original_normal and not leftovers()
    if hasattr(init, "no_tie_weights"):
        cm = init.no_tie_weights()
        cm.__enter__()
        assert "PreTrainedModel.tie_weights" in leftovers()
        restore(before, leftovers(before))
        assert PreTrainedModel.tie_weights is original_tie and not leftovers()
