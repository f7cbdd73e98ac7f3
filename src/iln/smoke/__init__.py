"""The smoke pipeline (``iln smoke``): the real ``dvc repro`` on small data in a copy of the
project, then a check that every stage delivered what the next ones and the user rely on."""
