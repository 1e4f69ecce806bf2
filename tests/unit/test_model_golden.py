"""The typed model interface gives what the dict interface gave: values recorded at commit dc6a225 (before
`forward(batch, targets)` and `Encoding`) for seeded tiny models of every family and the main ablations.
Losses, NLL, emotion logits, the squared gradient norm, the next-token distribution and the state_dict
signature (names and shapes: existing checkpoints still load) must all agree. ESCM's emotion logits were
re-recorded when they became the authors' summed head logits, log_softmax(logits_ctx + logits_cor), instead of
log((P_ctx + P_cor) / 2)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.unit import test_iamm
from tests.unit.model_batches import EMOTION_WORD_IDS, make_batch
from trainers.models import build_model
from trainers.models.interface import Targets
from trainers.tokens import SOS

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDED = {
    "transformer:full": dict(loss=4.070105075836182, gen_loss=4.070105075836182, emo_loss=0.0,
                nll_sum=75.563720703125, num_tokens=19, emotion_logits=None,
                grad_sq=4.672033162838602, next_token=145.45062106218666,
                state_dict="2b47847a3d0a01f6"),
    "transformer:pack_targets": dict(loss=4.070105075836182, gen_loss=4.070105075836182, emo_loss=0.0,
                nll_sum=75.56372833251953, num_tokens=19, emotion_logits=None,
                grad_sq=4.672033138490666, next_token=145.45062106218666,
                state_dict="2b47847a3d0a01f6"),
    "escm:full": dict(loss=10.73735523223877, gen_loss=3.9604456424713135, emo_loss=6.776909351348877,
                nll_sum=75.24846649169922, num_tokens=19, emotion_logits=-449.21794748306274,
                grad_sq=11.895393084129543, next_token=141.27911954881154,
                state_dict="867c8b9162395c63"),
    "escm:no_desv": dict(loss=11.251023292541504, gen_loss=4.313235282897949, emo_loss=6.937788009643555,
                nll_sum=81.95146942138672, num_tokens=19, emotion_logits=-447.2338697910309,
                grad_sq=13.489753196666866, next_token=156.78268789709142,
                state_dict="102728c9eb20cf65"),
    "escm:no_dcgcn": dict(loss=11.024266242980957, gen_loss=4.038135528564453, emo_loss=6.986130714416504,
                nll_sum=76.72457885742188, num_tokens=19, emotion_logits=-452.8270115852356,
                grad_sq=18.870136379202464, next_token=143.32654800782132,
                state_dict="4e2119e735046e38"),
    "escm:label_smoothing": dict(loss=10.81319808959961, gen_loss=4.036288738250732, emo_loss=6.776909351348877,
                nll_sum=75.24847412109375, num_tokens=19, emotion_logits=-449.21794748306274,
                grad_sq=11.408812671283483, next_token=141.27911954881154,
                state_dict="867c8b9162395c63"),
    "iamm:full": dict(loss=18.910018920898438, gen_loss=4.93004035949707, emo_loss=13.979978561401367,
                nll_sum=88.74072265625, num_tokens=18, emotion_logits=-465.0351982116699,
                grad_sq=22.669406105049966, next_token=192.54314585324732,
                state_dict="d0df423259edb495"),
    "iamm:no_ea": dict(loss=18.904634475708008, gen_loss=4.8967108726501465, emo_loss=14.00792407989502,
                nll_sum=88.14079284667969, num_tokens=18, emotion_logits=-465.56329345703125,
                grad_sq=23.199803025276346, next_token=196.34239468677785,
                state_dict="4932c6ece36e47c8"),
    "iamm:no_ia": dict(loss=18.89993667602539, gen_loss=4.879841327667236, emo_loss=14.020094871520996,
                nll_sum=87.83714294433594, num_tokens=18, emotion_logits=-464.9025967121124,
                grad_sq=22.32771402860439, next_token=191.34836351367622,
                state_dict="bd35548ab80da095"),
    "iamm:no_ws": dict(loss=18.966156005859375, gen_loss=4.986177444458008, emo_loss=13.979978561401367,
                nll_sum=89.7511978149414, num_tokens=18, emotion_logits=-465.0351982116699,
                grad_sq=25.95318134501312, next_token=193.69219322669517,
                state_dict="6222c462cabebe1e"),
    "iamm:has_knowledge": dict(loss=15.172483444213867, gen_loss=5.020480632781982, emo_loss=10.152002334594727,
                nll_sum=110.45057678222656, num_tokens=22, emotion_logits=-456.63256645202637,
                grad_sq=28.799687766266235, next_token=195.32458715206465,
                state_dict="a108d5fd9f7dd56a"),
}


def _signature(model) -> str:
    return hashlib.sha1(";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
                        .encode()).hexdigest()[:16]


def _measure(name: str, overrides: dict) -> dict:
    torch.manual_seed(0)
    V = 80 if name == "iamm" else 60
    m = build_model(name, V, EMOTION_WORD_IDS, flavour="tiny", **overrides)
    b = (test_iamm.make_batch(4, seed=3, knowledge=overrides.get("has_knowledge", True)) if name == "iamm"
         else make_batch(4, V, seed=3))
    out = m(b, Targets.of(b))
    out.loss.backward()
    with torch.no_grad():
        ys = torch.cat([torch.full_like(b.target_ids[:, :1], SOS), b.target_ext_ids[:, :2]], 1)
        lp = m.decode_step(m.encode(b), ys)
    el = out.emotion_logits
    return dict(loss=out.loss.item(), gen_loss=out.gen_loss.item(), emo_loss=out.emo_loss.item(),
                nll_sum=out.nll_sum.sum().item(), num_tokens=int(out.num_tokens.sum()),
                emotion_logits=None if el is None else float(el.double().sum()),
                grad_sq=sum(float(p.grad.double().pow(2).sum()) for p in m.parameters() if p.grad is not None),
                next_token=float(lp.double().exp().mul(torch.arange(lp.size(1))).sum()),  # E[next id]
                state_dict=_signature(m))


OVERRIDES = {"full": {}, "pack_targets": {"pack_targets": False}, "no_desv": {"no_desv": True},
             "no_dcgcn": {"no_dcgcn": True}, "label_smoothing": {"label_smoothing": 0.1}, "no_ea": {"no_ea": True},
             "no_ia": {"no_ia": True}, "no_ws": {"no_ws": True}, "has_knowledge": {"has_knowledge": False}}


@pytest.mark.parametrize("variant", list(RECORDED))
def test_forward_matches_the_values_recorded_before_the_typed_interface(variant):
    name, flag = variant.split(":")
    got, want = _measure(name, OVERRIDES[flag]), RECORDED[variant]
    assert got["state_dict"] == want["state_dict"] and got["num_tokens"] == want["num_tokens"]
    assert (got["emotion_logits"] is None) == (want["emotion_logits"] is None)
    for key in ("loss", "gen_loss", "emo_loss", "nll_sum", "emotion_logits", "grad_sq", "next_token"):
        if want[key] is not None:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
