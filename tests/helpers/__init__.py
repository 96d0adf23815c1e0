"""What the tests share: servers (server.py), engines that stand in for the model (replay.py), inputs built on
the fly (images.py, pdfs.py, hostile.py), the FACTS token counts (facts.py), job and replica drivers (jobs.py,
replicas.py), the hostile-server harness, the docs browser's checks and the GPU tests' server.

Test modules import from here and from conftest.py fixtures, never from one another
(tests/test_tests_layout.py checks it).
"""
