// Python bindings of the native kernels (declared in kernels.h).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("recurrence", &recurrence, "multi-head multi-direction LSTM/GRU recurrence (inference)", py::arg("xg"),
        py::arg("whh"), py::arg("bhh"), py::arg("sizes"), py::arg("lengths"), py::arg("is_lstm"),
        py::arg("bin") = torch::empty({0}));
  m.def("step", &step, "one decode step of every head of a forward-only LSTM/GRU layer");
  m.attr("half_weights") = recurrence_half_weights();
  m.attr("avx512") = recurrence_avx512();
  m.def("use_avx512", &recurrence_use_avx512,
        "pin the kernels' AVX-512 paths on (where the CPU has them) or off (AVX2); returns the setting");
  m.attr("hedgehog_available") = hedgehog_available();
  m.def("hedgehog", &hedgehog, "linear's hedgehog feature map of a [B*N, H*f] slice into [B, H, N, 2f]");
  m.def("token_conv_gelu", &token_conv_gelu,
        "conv's depthwise token convolution with the exact GELU and the residual fused, tokens-last");
}
