"""SecondLook core: the registry, reading scans and studies, the analysis pipeline, models and
explanations (the runtime), and apart from it `core.lab`: training, evaluation and audits.

Pure Python and torch; nothing in this package imports Streamlit.

OpenMP reads its wait policy once, when torch loads it. Waiting threads that spin hold a core a
neighbour (another process, another session's computation) needs: a forward pass went from 28 ms
to over 1 s on 2 cores beside one busy process (`core.threads`). So the policy is set here, before
any module of the package imports torch, unless the user chose one.
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
