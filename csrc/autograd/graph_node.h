// A hand-written autograd node, the way torch's generated ones are made (VariableType):
// the node holds its saved tensors and flags as plain members, forward records it on the
// outputs directly. Against torch::autograd::Function this skips the variable_list
// packing, the output wrapping and the saved_data hash map of every call, which is most
// of the host time of a small layer.
//
// Torch changed how nodes are owned (std::shared_ptr up to 2.12, c10::intrusive_ptr from 2.13);
// NodeRef and make_node follow whichever the installed torch's Edge uses.
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <memory>
#include <type_traits>

namespace fastreg {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using NodePtr = decltype(torch::autograd::Edge::function);
constexpr bool kSharedNodes = std::is_same_v<NodePtr, std::shared_ptr<Node>>;

template <typename T>
using NodeRef = std::conditional_t<kSharedNodes, std::shared_ptr<T>, c10::intrusive_ptr<T>>;

// A new node of type T whose gradient edges lead to `inputs` (undefined tensors: no edge),
// in the order of the gradients T::apply returns.
template <typename T, typename... Inputs>
NodeRef<T> make_node(const Inputs&... inputs) {
  NodeRef<T> node;
  if constexpr (kSharedNodes) {
    // torch's deleter, found through T's base class (a name torch >= 2.13 no longer has)
    node = NodeRef<T>(new T(), [](T* p) { deleteNode(p); });
  } else {
    node = c10::make_intrusive<T>();
  }
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

// Makes `output` the node's next gradient input (the node's outputs in order; an
// undefined tensor takes its slot without a gradient).
template <typename Ref>
void record_output(const at::Tensor& output, const Ref& node) {
  torch::autograd::set_history(output, NodePtr(node));
}

// The gradient slot of an output that takes none (not differentiable, or not returned).
template <typename Ref>
void skip_output(const Ref& node) {
  node->add_input_metadata(Node::undefined_input());
}

// An optional input as a tensor (undefined when absent), and back.
inline at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
inline std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace fastreg
