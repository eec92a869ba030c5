"""``sft export``: a tuned model where people run it, in its own package (``sft.models`` loads and saves).

- ``run``: ``export()`` / ``run_export``: find the run's model, merge a LoRA adapter, write ``hf`` or ``adapter``;
- ``gguf``: HF directory -> GGUF through llama.cpp's own converter and quantizer;
- ``ollama``: the ``Modelfile`` (the training template in Go-template syntax, its stops).
"""
