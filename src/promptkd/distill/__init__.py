"""PromptKD's two stages around the student method (:mod:`promptkd.methods.promptkd`).

- :mod:`promptkd.distill.teacher`: build/load a teacher from any method's checkpoint, and the pre-stored teacher text
  features (computed once, after the teacher's prompts are loaded; bound to classes and teacher).
- :mod:`promptkd.distill.data`: unlabelled image sources (dataset splits with labels dropped, folders, tar shards).
"""

from promptkd.distill.data import (
    TarImages,
    TarShardStream,
    UnlabeledSource,
    cap_items,
    expand_shards,
    from_folder,
    from_splits,
    shard_assignment,
    unlabeled_dataset,
)
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
    "TarImages",
    "TarShardStream",
    "Teacher",
    "TeacherError",
    "TeacherFeatures",
    "TeacherInput",
    "UnlabeledSource",
    "cap_items",
    "expand_shards",
    "from_folder",
    "from_splits",
    "load_teacher",
    "same_teacher",
    "shard_assignment",
    "teacher_description",
    "unlabeled_dataset",
    "zero_shot_teacher",
]
