"""Where the teacher's features come from: its forward (features.py), the feature cache that one
teacher pass writes (cache/, teach.py), and the source a stage asks for a batch's features
(source.py); each teacher's part in a run of one or several teachers (part.py)."""

from .features import TeacherFeatures, head_fn, take_rows, teacher_features

__all__ = ["TeacherFeatures", "head_fn", "take_rows", "teacher_features"]
