"""The analyses, run from the repository root as `python -m scripts.NAME`; nothing imports them: the study
(study.py), the mechanism figure (mechanism.py), the self-teacher's gap (teacher_gap.py) and the paper's difficulty
filter (filter_problems.py)."""
