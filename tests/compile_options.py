"""XLA options for programs that are tiny or only compiled: about half the CPU compile time.
They lower LLVM's optimization of the generated code only; the HLO passes, buffer assignment
and memory analysis are the same (checked: equal temp bytes, test_memory's models)."""
FAST = {"compiler_options": {"xla_backend_optimization_level": 0,
                             "xla_llvm_disable_expensive_passes": True}}
