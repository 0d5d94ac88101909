//! Examples and benchmarks of the Llama 4 workspace live beside this empty library.
