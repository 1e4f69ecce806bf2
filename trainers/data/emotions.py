"""The 32 EMPATHETIC-DIALOGUES emotion labels (Rashkin et al., 2019), in a fixed order.

The index of a label in `EMOTIONS` is its class id everywhere: models, metrics, serving.
"""

EMOTIONS: tuple[str, ...] = (
    "afraid", "angry", "annoyed", "anticipating", "anxious", "apprehensive", "ashamed",
    "caring", "confident", "content", "devastated", "disappointed", "disgusted",
    "embarrassed", "excited", "faithful", "furious", "grateful", "guilty", "hopeful",
    "impressed", "jealous", "joyful", "lonely", "nostalgic", "prepared", "proud", "sad",
    "sentimental", "surprised", "terrified", "trusting",
)
EMOTION_TO_ID: dict[str, int] = {e: i for i, e in enumerate(EMOTIONS)}
NUM_EMOTIONS = len(EMOTIONS)
