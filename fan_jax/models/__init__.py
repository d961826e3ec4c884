"""Networks: MobileNetV2 / ResNet encoders, deconv decoder, heatmap head, KD adapters."""
