// Umbrella header: includes the whole library but gguf.hpp, gguf_adapter.hpp, init.hpp, targets.hpp, and the
// low-precision weights (quant.hpp, quant_io.hpp), which are included on their own.
#pragma once

#include <lora/activations.hpp>
#include <lora/checkpoint.hpp>
#include <lora/config.hpp>
#include <lora/embedding.hpp>
#include <lora/errors.hpp>
#include <lora/fused.hpp>
#include <lora/gradcheck.hpp>
#include <lora/linear.hpp>
#include <lora/loss.hpp>
#include <lora/multi.hpp>
#include <lora/optim.hpp>
#include <lora/params.hpp>
#include <lora/peft.hpp>
#include <lora/safetensors.hpp>
#include <lora/schedule.hpp>
#include <lora/sequential.hpp>
#include <lora/types.hpp>
#include <lora/weight.hpp>
