"""The runtime layer under the engine: what one step program needs (inputs, sampling, the
compiled forward), shared by the placed and the CrossPool runners."""
