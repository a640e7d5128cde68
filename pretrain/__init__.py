"""pretrain: MaPeT and BEiT pre-training of ViTs on cached tokenkit targets, and their evaluation.

Data flows one way: token store -> trainer -> checkpoint -> evaluation / export. pretrain imports tokenkit
(upstream), never the reverse.
"""
