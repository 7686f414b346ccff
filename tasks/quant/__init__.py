"""The quantization wing: the engine interface with its FX and PT2E implementations, and what
tells which ops of a converted model run as int8 on each runtime."""
