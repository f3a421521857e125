//! all-MiniLM-L6-v2 sentence embeddings as an inference service.
#![allow(clippy::indexing_slicing)] // a kernel's own panics end only its own job

pub mod tokenizer;
