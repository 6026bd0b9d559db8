"""PromptKD's two stages around the student method (:mod:`promptkd.methods.promptkd`).

- :mod:`promptkd.distill.teacher`: build/load a teacher from any method's checkpoint, and the pre-stored teacher text
  features (computed once, after the teacher's prompts are loaded; bound to classes and teacher).
- :mod:`promptkd.distill.data`: unlabelled image sources (dataset splits with labels dropped, folders); tar shards
  stream through :mod:`promptkd.engine.stream`.
- :mod:`promptkd.distill.cache`: stored views and the teacher's cached soft labels (FKD), so the frozen teacher
  runs once per view rather than once per epoch, seed and sweep.
"""

from promptkd.distill.cache import TeacherCache, TeacherCacheError, ViewRecipe
from promptkd.distill.data import UnlabeledSource, cap_items, from_folder, from_splits, unlabeled_dataset
from promptkd.distill.teacher import (
    TEACHER_METHODS,
    Teacher,
    TeacherError,
    TeacherFeatures,
    TeacherInput,
    load_teacher,
    same_teacher,
    teacher_description,
    zero_shot_teacher,
)

__all__ = [
    "TEACHER_METHODS",
    "Teacher",
    "TeacherCache",
    "TeacherCacheError",
    "TeacherError",
    "TeacherFeatures",
    "TeacherInput",
    "UnlabeledSource",
    "ViewRecipe",
    "cap_items",
    "from_folder",
    "from_splits",
    "load_teacher",
    "same_teacher",
    "teacher_description",
    "unlabeled_dataset",
    "zero_shot_teacher",
]
