"""`python -m layermoe_core.offline_corpus ...`, the command earlier READMEs gave, now `python -m demo.offline_corpus`.

The demo's corpus builder left the library for the `demo` package; this keeps the old command working
(it imports nothing from `demo` unless run) and goes once no caller is left.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("demo.offline_corpus", run_name="__main__", alter_sys=True)
