"""Special token ids and dialogue-state ids: the one definition the vocabulary, collation, the models and
decoding share. It imports nothing, so the models can use it and still depend on torch alone.

Ids 0..7 of every vocabulary are the special tokens, in this order (`SPECIALS` is their text); the 32
emotion words follow them (trainers.data.vocab).
"""

PAD, UNK, SOS, EOS, CLS, SPK, LSN, SIT = range(8)
SPECIALS = ("[PAD]", "[UNK]", "[SOS]", "[EOS]", "[CLS]", "[SPK]", "[LSN]", "[SIT]")

# Dialogue-state ids (`context_state`, `utt_state`): rows of the models' state embedding.
STATE_PAD, STATE_CLS, STATE_SPEAKER, STATE_LISTENER = range(4)

# Relation id of the self loops the ESCM symmetric graph adds (`context_dep` labels start at 2).
DEP_SELF = 1
