// The native kernels' entry points, bound to Python in bindings.cpp (one extension, built by
// replacements/native.py): the multi-head recurrence (recurrence.cpp), conv's token convolution
// (token_conv.cpp) and linear's hedgehog feature map (feature_map.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

// recurrence.cpp: every head's and direction's LSTM/GRU recurrence in one call, and one decode step
torch::Tensor recurrence(torch::Tensor xg, torch::Tensor whh, torch::Tensor bhh, torch::Tensor sizes,
                         torch::Tensor lengths, bool is_lstm, torch::Tensor bin);
std::vector<torch::Tensor> step(torch::Tensor x, torch::Tensor win, torch::Tensor bin, torch::Tensor whh,
                                torch::Tensor bhh, torch::Tensor h, torch::Tensor c, torch::Tensor sizes,
                                bool is_lstm);
bool recurrence_half_weights();
bool recurrence_avx512();
bool recurrence_use_avx512(bool on);  // both kernels' AVX-512 paths

// feature_map.cpp: linear's hedgehog map [softmax(z), softmax(-z)] per (token, head) row, AVX-512
bool hedgehog_available();
torch::Tensor hedgehog(torch::Tensor z, int64_t batch, int64_t heads, int64_t f);

// token_conv.cpp: y + gelu(depthwise_conv(y) + bias) over the tokens of a [B, N, C] tensor
torch::Tensor token_conv_gelu(torch::Tensor y, torch::Tensor weight, torch::Tensor bias, int64_t left);
