"""The tiny offline default: a synthetic WikiText-style corpus, a tokenizer, a trained teacher, a student.

`python -m tiny_world [--out tiny] [--force]` builds, deterministically (byte-identical files) and in about
a minute on two idle CPU cores, everything the pipeline needs to run end to end with no GPU and no hub:

    <out>/data/wiki.{train,valid,test}.raw   a made-up encyclopedia in the WikiText-2 raw layout
    <out>/teacher                            Qwen2ForCausalLM, 4 layers, briefly trained on the train split
    <out>/student                            Qwen2ForCausalLM, 2 layers, random init (stage two trains it)
    <out>/READY.json                         written last: the build is complete

Modules: `corpus` (the world, its grammar and the corpus text), `models` (tokenizer, padded vocabularies,
model shapes, teacher training, perplexity), `build` (the build above and its command line). Neither stage
imports this package; it only makes their inputs (and `bench.quality` reuses its tokenizer and models).
"""
