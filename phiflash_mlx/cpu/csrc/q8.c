/* Products of affine-quantized weights with int8-quantized activations. */
