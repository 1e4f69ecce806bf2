"""The `recipe` switch: the paper recipe changes the training computation, explicit settings win, bad names fail;
the two ESCM graphs of eq. 8 differ exactly where the parse says they should."""

from __future__ import annotations

import pytest
import torch

from trainers.config import ConfigError, TrainConfig, load_config
from trainers.loop import OOV_EMBEDDING_STD, Trainer
from trainers.models import build_model
from trainers.models.escm import reference_graph, symmetric_graph
from trainers.models.layers import xavier_init_
from trainers.tokens import DEP_SELF, PAD, SOS

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(tmp_path, prepared_sample, **kw):
    base = {"model": "escm", "out_dir": str(tmp_path / "run"), "device": "cpu", "bf16": False,
            "data": {"source": "sample", "cache_dir": str(prepared_sample.path.parent)},
            "model_overrides": {"flavour": "tiny"}, "warmup": 20, "batch_size": 8, "eval_generate": 4,
            "num_samples": 0}
    return load_config(TrainConfig, **{**base, **kw})


# ---- the switch --------------------------------------------------------------------------------


def test_platform_is_the_default_and_leaves_the_defaults():
    cfg = load_config(TrainConfig)
    assert cfg.recipe == "platform" and cfg == load_config(TrainConfig, recipe="platform")
    assert (cfg.grad_clip, cfg.embedding_init, cfg.selection, cfg.max_steps) == (2.0, "rescaled", "early_stop", 13500)


@pytest.mark.parametrize("model, steps, first_eval, ppl, acc", [
    ("transformer", 18400, 11200, 43.0, 0.385), ("escm", 18400, 11200, 43.0, 0.385), ("iamm", 17600, 10400, 38.0, 0.5)])
def test_paper_recipe_gives_the_reference_schedule_per_model(model, steps, first_eval, ppl, acc):
    cfg = load_config(TrainConfig, overrides=[f"model={model}", "recipe=paper"])
    assert (cfg.max_steps, cfg.eval_from, cfg.eval_every, cfg.select_ppl, cfg.select_acc) == (
        steps, first_eval, 800, ppl, acc)
    assert cfg.grad_clip == 0 and cfg.selection == "reference" and cfg.embedding_init == "vectors"
    assert cfg.decode_config().max_len == 51 and cfg.decode_config().strategy == "greedy"
    assert cfg.model_overrides["xavier_init"] and cfg.model_overrides["state_from_words"]
    assert cfg.model_overrides.get("gcn_graph") == ("reference" if model == "escm" else None)


IAMM_REFERENCE = {"association_weights": "reference", "word_selector": "reference", "k3": 15, "utterance_cls": True,
                  "association_inputs": "words_states"}


def test_paper_recipe_builds_iamm_with_the_authors_four_choices_and_platform_does_not():
    from trainers.models import config_for

    paper = load_config(TrainConfig, overrides=["model=iamm", "recipe=paper"])
    resolved = config_for("iamm", **paper.model_overrides, has_knowledge=False)  # as the trainer builds it
    assert {k: getattr(resolved, k) for k in IAMM_REFERENCE} == IAMM_REFERENCE
    for note in ("association weights as", "word selector over V", "[CLS] before every turn", "dialogue-state"):
        assert note in resolved.notes
    assert "no commonsense knowledge" in resolved.notes  # no paper row applies without knowledge
    platform = config_for("iamm", **load_config(TrainConfig, overrides=["model=iamm"]).model_overrides)
    assert (platform.association_weights, platform.word_selector, platform.k3, platform.utterance_cls,
            platform.association_inputs) == ("paper", "paper", 5, False, "words")
    mine = load_config(TrainConfig, overrides=["model=iamm", "recipe=paper", "model_overrides.utterance_cls=false"])
    assert mine.model_overrides["utterance_cls"] is False and mine.model_overrides["k3"] == 15  # one key wins


def test_explicit_settings_win_over_the_recipe():
    cfg = load_config(TrainConfig, overrides=["recipe=paper", "grad_clip=1.5", "model_overrides.gcn_graph=symmetric",
                                              "decode.max_len=20"], model="escm")
    assert cfg.grad_clip == 1.5 and cfg.decode_config().max_len == 20
    assert cfg.model_overrides["gcn_graph"] == "symmetric" and cfg.model_overrides["xavier_init"] is True
    assert cfg.decode_config().strategy == "greedy"  # the recipe's other decode field stays
    # a resolved config (a checkpoint's) validates to itself
    assert TrainConfig.model_validate(cfg.model_dump()) == cfg


def test_unknown_recipe_is_a_config_error():
    with pytest.raises(ConfigError, match="recipe"):
        load_config(TrainConfig, overrides=["recipe=papers"])


# ---- the computation ---------------------------------------------------------------------------


def _two_updates(tmp_path, prepared_sample, **kw) -> torch.Tensor:
    """Parameters after two steps on two fixed batches, the second one's loss scaled x1000 (a large gradient)."""
    trainer = Trainer(make_cfg(tmp_path, prepared_sample, **kw), prepared_sample, log=lambda s: None)
    plan = trainer.train_data.plan(8, seed=0, epoch=0)
    (k1, r1), (k2, r2) = plan[0], plan[1]
    trainer.train_step(trainer.train_data.rows_batch(k1, r1))
    model_forward = trainer.model.forward
    trainer.model.forward = lambda *a: _scaled(model_forward(*a), 1000.0)
    trainer.train_step(trainer.train_data.rows_batch(k2, r2))
    return torch.cat([p.detach().flatten() for p in trainer.raw_model.parameters()])


def _scaled(out, factor):
    out.loss = out.loss * factor
    return out


def test_paper_recipe_does_not_clip_a_large_gradient(tmp_path, prepared_sample):
    paper = _two_updates(tmp_path / "a", prepared_sample, recipe="paper")
    again = _two_updates(tmp_path / "b", prepared_sample, recipe="paper")
    clipped = _two_updates(tmp_path / "c", prepared_sample, recipe="paper", grad_clip=2.0)
    assert torch.equal(paper, again)
    # Adam is scale invariant per step, but not across steps: clipping only the large second gradient changes
    # the second update
    assert (paper - clipped).abs().max() > 1e-4


def test_word_embedding_init_per_recipe(tmp_path, prepared_sample):
    vectors = torch.from_numpy(prepared_sample.vectors())
    has = torch.from_numpy(prepared_sample.vector_rows())
    without = ~has
    without[PAD] = False
    assert has.any() and without.any()
    tiny_300 = {"flavour": "tiny", "emb_dim": 300}  # the vectors' size
    paper = Trainer(make_cfg(tmp_path / "p", prepared_sample, recipe="paper", model_overrides=tiny_300),
                    prepared_sample, log=lambda s: None)
    w = paper.raw_model.embedding.weight.detach()
    assert torch.equal(w[has], vectors[has])  # the vectors' own scale
    assert paper.cfg.vector_scale == 1.0 and paper.state_dict()["config"]["vector_scale"] == 1.0  # unseen_vectors
    assert abs(w[without].std().item() - OOV_EMBEDDING_STD) < 0.1 * OOV_EMBEDDING_STD and not w[PAD].any()
    platform = Trainer(make_cfg(tmp_path / "q", prepared_sample, model_overrides=tiny_300), prepared_sample,
                       log=lambda s: None)
    w = platform.raw_model.embedding.weight.detach()
    # rescaled: the mean row norm of the model's own init (~1: unit scale after x sqrt(emb_dim)), the vectors'
    # directions and relative norms
    assert abs(w[1:].norm(dim=1).mean().item() - 1.0) < 0.05
    ratio = w[has].norm(dim=1) / vectors[has].norm(dim=1)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-3) and ratio[0] < 0.5
    assert platform.cfg.vector_scale == pytest.approx(ratio[0].item(), rel=1e-4)  # recorded for unseen_vectors
    assert paper.cfg.unseen_vectors and not platform.cfg.unseen_vectors
    bare = Trainer(make_cfg(tmp_path / "r", prepared_sample, recipe="paper", use_vectors=False), prepared_sample,
                   log=lambda s: None)
    assert (bare.cfg.vector_scale, bare.cfg.unseen_vectors) == (None, False)  # no vectors to go on: off


def test_xavier_init_spares_the_word_embedding_and_padding_rows():
    kw = dict(vocab_size=60, emotion_word_ids=list(range(8, 40)), flavour="tiny")
    bound = (6 / (32 + 32)) ** 0.5  # xavier-uniform of a (32, 32) matrix; PyTorch's Linear default: 1 / sqrt(32)
    plain = build_model("escm", **kw)
    assert plain.enc_ctx.proj.weight.abs().max() < 0.9 * bound
    model = build_model("escm", **kw, state_from_words=True)
    before = model.embedding.weight.detach().clone()
    xavier_init_(model)
    assert torch.equal(model.embedding.weight, before)
    assert 0.9 * bound < model.enc_ctx.proj.weight.abs().max() <= bound
    assert not model.gcn.pos_emb.weight[0].any() and not model.gcn.rel_emb.weight[0].any()
    assert not hasattr(model, "state_embedding")  # the states are rows of the word table
    assert build_model("escm", **kw, xavier_init=True).enc_ctx.proj.weight.abs().max() > 0.9 * bound


def test_paper_recipe_evaluates_on_its_schedule_and_keeps_by_the_reference_rule(tmp_path, prepared_sample,
                                                                                monkeypatch):
    cfg = make_cfg(tmp_path, prepared_sample, recipe="paper", max_steps=20, eval_every=4, eval_from=8, log_every=2)
    reported = []
    trainer = Trainer(cfg, prepared_sample, log=lambda s: None,
                      on_checkpoint=lambda info, path: reported.append((info, path)))
    # (PPL, Acc) per evaluation: 42.0 kept (<= 100); 42.5 / 0.3 not (worse, Acc too low); 42.8 / 0.4 kept
    # (PPL < 43 and Acc > 0.385, although worse than 42.0); 43.5 / 0.5 not (worse than 42.8 and not < 43)
    results = iter([(42.0, 0.2), (42.5, 0.3), (42.8, 0.4), (43.5, 0.5)])
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: dict(zip(("ppl", "acc"), next(results))))
    saved = []
    monkeypatch.setattr(trainer, "save_checkpoint",
                        lambda tag=None: saved.append((trainer.step, tag)) or f"step_{trainer.step}.pt")
    monkeypatch.setattr(trainer, "finish", lambda: trainer.history)
    history = trainer.train()
    assert [h["step"] for h in history if "valid_ppl" in h] == [8, 12, 16, 20]  # none before eval_from
    assert [step for step, tag in saved if tag == "best"] == [8, 16] and trainer.best == 42.8
    assert [step for step, tag in saved if tag is None] == [4, 8, 12, 16, 20]  # resumable before eval_from too
    # ... and that resume checkpoint reaches the hook Ray Train reports through
    [(info, path)] = reported
    assert (info["step"], path) == (4, "step_4.pt") and info["train_loss"] > 0


# ---- ESCM's two graphs (eq. 8) -----------------------------------------------------------------


def test_the_two_graphs_differ_exactly_where_the_parse_says():
    # [CLS] I(1) miss(2) home(3) + one pad: "miss" is the root, "I" (nsubj = 5) and "home" (dobj = 7) its
    # dependents; ROOT = 2. The batch carries the directed parse.
    ROOT, NSUBJ, DOBJ, CLS_REL = 2, 5, 7, 48
    dep = torch.zeros(1, 5, 5, dtype=torch.long)
    dep[0, 2, 1], dep[0, 2, 3], dep[0, 2, 2] = NSUBJ, DOBJ, ROOT
    mask = torch.tensor([[True, True, True, True, False]])
    S = DEP_SELF
    symmetric = torch.tensor([[S, CLS_REL, CLS_REL, CLS_REL, 0],
                              [CLS_REL, S, NSUBJ, 0, 0],
                              [CLS_REL, NSUBJ, S, DOBJ, 0],
                              [CLS_REL, 0, DOBJ, S, 0],
                              [0, 0, 0, 0, 0]])
    reference = torch.tensor([[CLS_REL, CLS_REL, CLS_REL, CLS_REL, 0],
                              [CLS_REL, 0, 0, 0, 0],  # a leaf attends to [CLS] only
                              [CLS_REL, NSUBJ, ROOT, DOBJ, 0],  # head -> dependents, the root's own loop
                              [CLS_REL, 0, 0, 0, 0],
                              [0, 0, 0, 0, 0]])
    assert torch.equal(symmetric_graph(dep, mask, CLS_REL)[0], symmetric)
    assert torch.equal(reference_graph(dep, mask, CLS_REL)[0], reference)
    assert torch.equal(reference_graph(dep, mask, None)[0], reference.masked_fill(reference == CLS_REL, 0))


def test_reference_graph_shares_one_pos_relation_table_and_attends_along_it():
    from tests.unit.model_batches import EMOTION_WORD_IDS, make_batch

    model = build_model("escm", 60, EMOTION_WORD_IDS, flavour="tiny", gcn_graph="reference", gcn_scaled=False)
    gcn = model.gcn
    assert not hasattr(gcn, "pos_emb") and gcn.tag_rel_emb.num_embeddings == 20 + 48 + 1
    V_p, V_r = gcn.tables()
    assert V_p.data_ptr() == gcn.tag_rel_emb.weight.data_ptr() and V_r.shape == (49, 8)
    b = make_batch(3, 60, seed=4)
    p = model.encode(b).extras["gcn_p"]
    allowed = reference_graph(b.context_dep, b.context_mask, 48) > 0
    assert (p[~allowed] == 0).all() and torch.allclose(p.sum(-1)[b.context_mask], torch.ones(()))
    ev = model.evidence(b, k=3)  # the evidence pairs are edges of the graph the model used
    for i, pairs in enumerate(ev["pairs"].tolist()):
        assert all(allowed[i, a, c] and a != c and a > 0 and c > 0 for a, c in pairs if a >= 0)


def test_reference_ffn_and_dialogue_states():
    from tests.unit.model_batches import EMOTION_WORD_IDS, make_batch
    from trainers.tokens import CLS, LSN, SPK, STATE_CLS, STATE_LISTENER, STATE_PAD, STATE_SPEAKER

    kw = dict(flavour="tiny", ffn_relu_out=True, state_from_words=True)
    torch.manual_seed(0)
    model = build_model("transformer", 60, EMOTION_WORD_IDS, **kw)
    ffn = model.enc_ctx.blocks[0].ffn
    x = torch.randn(2, 5, 32)
    assert (ffn(x) >= 0).all() and (ffn(x) > 0).any()  # ReLU after the last convolution too
    states = torch.tensor([STATE_PAD, STATE_CLS, STATE_SPEAKER, STATE_LISTENER])
    words = torch.tensor([PAD, CLS, SPK, LSN])
    assert torch.equal(model.embed_state(states), model.embed(words))  # the word table's rows, x sqrt(emb_dim)
    ffn.relu_out = False  # the platform's FFN: the same weights give negative outputs
    assert (ffn(x) < 0).any()
    assert torch.isfinite(model(make_batch(2, 60, seed=1)).encoding.memory).all()


@pytest.mark.parametrize("state_from_words", [False, True])
@pytest.mark.parametrize("model", ["transformer", "escm", "iamm"])
def test_encode_looks_the_word_table_up_once(tmp_path, prepared_sample, model, state_from_words):
    """Each lookup of the word table costs backward a dense (V x emb) gradient: encode makes one, and
    `embed_many` gives what separate `embed` / `embed_state` calls give."""
    cfg = make_cfg(tmp_path, prepared_sample, model=model,
                   model_overrides={"flavour": "tiny", "state_from_words": state_from_words})
    trainer = Trainer(cfg, prepared_sample, log=lambda s: None)
    m, split = trainer.raw_model, trainer.train_data
    batch = split.rows_batch(*split.plan(8, seed=0, epoch=0)[0])
    lookups = []
    m.embedding.register_forward_hook(lambda module, args, out: lookups.append(args[0].shape))
    m.encode(batch)
    assert len(lookups) == 1, lookups
    ids, states = batch.context_ids, batch.context_state
    sos = torch.full_like(ids[:, :1], SOS)
    E_c, E_sos, E_r = m.embed_many(ids, sos, states=(states,))
    assert torch.equal(E_c, m.embed(ids)) and torch.equal(E_sos, m.embed(sos))
    assert torch.equal(E_r, m.embed_state(states))


def _scaled_pair(**kw):
    """Two ESCMs with the same weights, without and with `gcn_embed_scale`."""
    from tests.unit.model_batches import EMOTION_WORD_IDS

    common = dict(flavour="tiny", gcn_graph="reference", gcn_scaled=False, **kw)
    torch.manual_seed(0)
    plain = build_model("escm", 60, EMOTION_WORD_IDS, **common)
    scaled = build_model("escm", 60, EMOTION_WORD_IDS, **common, gcn_embed_scale=True)
    scaled.load_state_dict(plain.state_dict())  # same parameter set: the flag adds none
    return plain, scaled


def test_gcn_embed_scale_multiplies_the_pos_and_relation_terms_by_d_pr():
    """The reference's tag/relation rows come out of an Embeddings wrapper (x sqrt(d_pr)), so in eq. 7's dot
    product the POS and relation terms grow by d_pr and the H_des term does not."""
    from tests.unit.model_batches import make_batch

    plain, scaled = _scaled_pair()
    d_pr = plain.cfg.d_pr
    b = make_batch(3, 60, seed=5)
    rel = plain.gcn.relations(b.context_dep, b.context_mask)
    H_des = torch.randn(3, b.context_ids.size(1), plain.cfg.d_s + plain.cfg.num_emotions)
    V_p, V_r = plain.gcn.tables()
    P = torch.nn.functional.embedding(b.context_pos, V_p)
    tag_terms = P @ P.transpose(1, 2) + V_r.pow(2).sum(-1)[rel]
    got = scaled.gcn.scores(H_des, b.context_pos, rel) - plain.gcn.scores(H_des, b.context_pos, rel)
    assert torch.allclose(got, (d_pr - 1) * tag_terms, rtol=1e-4, atol=1e-3) and tag_terms.abs().max() > 0.1
    with torch.no_grad():
        p_plain, p_scaled = plain.encode(b).extras["gcn_p"], scaled.encode(b).extras["gcn_p"]
    assert (p_plain - p_scaled).abs().max() > 1e-3  # the attention changes ...
    assert (p_scaled[rel == 0] == 0).all()  # ... on the same graph
    assert torch.allclose(p_scaled.sum(-1)[b.context_mask], torch.ones(()))


def test_gcn_embed_scale_changes_nothing_without_the_tag_and_relation_terms():
    from tests.unit.model_batches import make_batch

    plain, scaled = _scaled_pair(no_vp=True, no_vr=True)
    b = make_batch(3, 60, seed=6)
    with torch.no_grad():
        assert torch.equal(plain.encode(b).memory, scaled.encode(b).memory)


def test_paper_recipe_scales_the_gcn_embeddings_and_platform_does_not():
    paper = load_config(TrainConfig, overrides=["model=escm", "recipe=paper"])
    assert paper.model_overrides["gcn_embed_scale"] is True
    assert "gcn_embed_scale" not in load_config(TrainConfig, overrides=["model=escm"]).model_overrides
    assert build_model("escm", 60, list(range(8, 40)), flavour="tiny").cfg.gcn_embed_scale is False
