//! Tests of the `llm` model.
