"""The tests behind each claim of README.md's status table ("Status: what works today").

``CLAIMS`` maps the start of a row's feature cell to ``{column: [pytest node ids]}``; ``"*"`` stands for every
column the row does not name, and ``{s}`` in a node id for the column's ``pipeline.schedule`` value.
``tests/unit/test_status_table.py`` checks that every cell that claims something (any cell but ``-``, one that
starts with ``no`` or one that says ``untested``) names at least one test here, and that every test named is
collected by pytest: a claim added without its test, or a test renamed, fails the suite.
"""

COLUMNS = {  # the table's column -> pipeline.schedule
    "1f1b": "1f1b",
    "zb1p": "zb1p",
    "il-1f1b": "interleaved-1f1b",
    "il-1f1b-ov": "interleaved-1f1b-overlap",
    "zbv": "zbv",
    "dualpipe": "dualpipe",
    "dualpipev": "dualpipev",
    "ds-dualpipev": "ds-dualpipev",
}

EQUIVALENCE = "tests/distributed/test_equivalence.py::"
FP16 = "tests/distributed/test_fp16.py::"
MEGATRON = "tests/distributed/test_megatron.py::"
ACROSS = ("tests/distributed/checkpoint/test_across_schedules.py::"
          "test_a_checkpoint_written_under_one_schedule_continues_under_another_as_if_uninterrupted")
REFUSED = ("tests/distributed/checkpoint/test_across_schedules.py::"
           "test_engine_load_checkpoint_refuses_optimizer_state_of_another_placement_whichever_engine_loads")
DAMAGED = ("tests/distributed/checkpoint/test_across_schedules.py::"
           "test_a_file_with_8_bytes_overwritten_in_place_is_refused_naming_it")
MOE = "tests/distributed/test_moe_equivalence.py::test_moe_model_with_expert_parallelism_matches_one_process_at_P2"

CLAIMS = {
    "DeepSpeed `PipeSchedule` / `PipeInstruction` stream": {
        "*": ["tests/unit/test_schedules.py::test_schedules_are_deepspeed_pipe_schedules_of_pipe_instructions[{s}]"],
        "1f1b": ["tests/unit/test_schedules.py::test_1f1b_is_deepspeeds_own_train_schedule_unchanged"],
    },
    "per-rank order equals a reference": {
        "*": ["tests/unit/test_schedules.py::test_every_rank_runs_the_compute_order_of_deepseeks_reference[{s}]"],
        "il-1f1b": [
            "tests/unit/test_torch_orders.py::"
            "test_every_rank_runs_torchs_compute_order_and_accepts_the_same_shapes[interleaved-1f1b]"
        ],
        "zbv": [
            "tests/unit/test_torch_orders.py::test_every_rank_runs_torchs_compute_order_and_accepts_the_same_shapes[zbv]"
        ],
    },
    "same losses and weights as one process": {
        "*": [
            EQUIVALENCE + f"test_schedule_trains_to_the_losses_and_weights_of_a_single_process[{shape}-{{s}}]"
            for shape in ("2-1", "4-1", "2-2", "4-2")
        ],
    },
    "p2p that NCCL can complete": {
        "*": [
            "tests/unit/test_verify.py::test_every_registered_schedule_verifies_for_every_valid_shape[{s}]",
            "tests/distributed/test_strict_p2p.py::"
            "test_every_schedule_trains_like_one_process_under_nccls_point_to_point_rules[2-{s}]",
            "tests/distributed/test_strict_p2p.py::"
            "test_every_schedule_trains_like_one_process_under_nccls_point_to_point_rules[4-{s}]",
        ],
    },
    "backward split into I and W": {
        "*": [
            "tests/unit/test_split_backward.py::test_input_then_weight_part_matches_plain_backward[True]",
            EQUIVALENCE + "test_schedule_trains_to_the_losses_and_weights_of_a_single_process[2-1-{s}]",
        ],
    },
    "overlapped forward+backward pairs": {
        "*": [MOE + "[{s}-True]", MOE + "[{s}-False]"],
        "dualpipe": [
            MOE + "[dualpipe-True]",
            "tests/distributed/test_moe_equivalence.py::"
            "test_in_overlapped_pairs_an_all_to_all_of_one_micro_batch_completes_while_the_other_computes",
        ],
    },
    "gradient clipping by the true global norm": {
        "*": [
            EQUIVALENCE + "test_gradient_clipping_counts_every_parameter_once[2-1-{s}-clipped]",
            "tests/distributed/test_tensor_parallel.py::"
            "test_clipping_scales_every_rank_by_the_true_global_norm_under_tensor_parallelism[{s}]",
        ],
    },
    "`eval_batch`, tied layers": {
        "*": [EQUIVALENCE + "test_eval_batch_returns_the_mean_loss_of_the_trained_model_on_every_rank[2-1-{s}]"],
    },
    "tensor parallelism": {
        "*": [
            "tests/distributed/test_tensor_parallel.py::"
            "test_every_schedule_trains_tensor_parallel_shards_to_the_numbers_of_one_process[{s}]"
        ],
        "dualpipe": [
            "tests/distributed/test_tensor_parallel.py::"
            "test_every_schedule_trains_tensor_parallel_shards_to_the_numbers_of_one_process[dualpipe]",
            "tests/distributed/test_tensor_parallel.py::"
            "test_dualpipe_trains_tensor_parallel_shards_with_data_parallel_replicas_to_the_numbers_of_one_process"
            "[dualpipe]",
        ],
    },
    "collectives in a consistent order across communicators": {
        "*": [
            "tests/unit/test_verify.py::"
            "test_the_end_of_a_batch_issues_its_collectives_on_their_communicators_in_one_order_on_every_rank",
            "tests/distributed/test_moe_strict.py::"
            "test_moe_with_expert_parallelism_trains_like_one_process_with_no_crossed_order[{s}-True]",
        ],
    },
    "ZeRO-1, bf16": {
        "*": [
            EQUIVALENCE + "test_zero_stage_1_trains_to_the_same_numbers[2-1-{s}-zero1]",
            EQUIVALENCE + "test_bf16_trains_close_to_the_fp32_single_process[2-1-{s}-bf16]",
        ],
        "zb1p": [EQUIVALENCE + "test_bf16_trains_close_to_the_fp32_single_process[2-1-zb1p-bf16]"],
    },
    "checkpoints: DeepSpeed's layout": {
        "1f1b": [ACROSS + "[1f1b-dualpipe]", ACROSS + "[dualpipe-1f1b]", REFUSED + "[dualpipev-1f1b]"],
        "zb1p": [ACROSS + "[zb1p-dualpipev]", ACROSS + "[dualpipev-zb1p]", REFUSED + "[dualpipev-zb1p]"],
        "dualpipe": [
            ACROSS + "[dualpipe-dualpipe]",
            "tests/distributed/checkpoint/test_atomic.py::"
            "test_the_previous_checkpoint_loads_exactly_and_training_continues_as_if_uninterrupted",
            "tests/distributed/checkpoint/test_across_depths.py::"
            "test_a_checkpoint_continues_at_another_pipeline_depth_as_if_uninterrupted[dualpipe-P4-to-dualpipev-P2]",
        ],
        "dualpipev": [
            ACROSS + "[dualpipev-dualpipev]", ACROSS + "[zb1p-dualpipev]", REFUSED + "[zb1p-dualpipev]",
            DAMAGED + "[layer_03-model_states.pt]", DAMAGED + "[mp_rank_00_model_states.pt]"
        ],
        "ds-dualpipev":
        [ACROSS + "[ds-dualpipev-dualpipev]", ACROSS + "[dualpipe-ds-dualpipev]", REFUSED + "[zb1p-ds-dualpipev]"],
    },
    "fp16: static and dynamic loss scaling": {
        "1f1b": [
            FP16 + "test_fp16_with_a_static_loss_scale_trains_close_to_the_fp32_single_process[1f1b-zero1]",
            FP16 + "test_a_huge_initial_loss_scale_overflows_and_halves_until_it_fits_then_trains",
        ],
        "*": [
            FP16 + "test_fp16_with_a_static_loss_scale_trains_close_to_the_fp32_single_process[{s}]",
            FP16 + "test_fp16_with_a_static_loss_scale_trains_close_to_the_fp32_single_process[{s}-zero1]",
            FP16 + "test_an_inf_on_one_rank_skips_the_step_on_every_rank_as_in_deepspeed[{s}-inject]",
        ],
        "zb1p": [
            FP16 + "test_fp16_with_a_static_loss_scale_trains_close_to_the_fp32_single_process[zb1p]",
            FP16 + "test_an_inf_on_one_rank_skips_the_step_on_every_rank_as_in_deepspeed[zb1p-inject]",
        ],
    },
    "verifier, simulator beside Table 2, timeline picture": {
        "*": [
            "tests/unit/test_verify.py::test_every_registered_schedule_verifies_for_every_valid_shape[{s}]",
            "tests/unit/test_simulate.py::test_memory_columns_of_table_2",
            "tests/unit/test_plot.py::test_title_and_measured_timeline",
        ],
    },
    "MoE (`DualPipeMoE`, EP inside DP)": {
        "*": [MOE + "[{s}-True]"],
    },
    "Megatron-DeepSpeed GPT-MoE": {
        "1f1b": [MEGATRON + "test_deepspeeds_1f1b_trains_the_job"],
        "*": [MEGATRON + "test_the_unchanged_job_trains_like_1f1b_under_every_plugin_schedule[{s}]"],
    },
}
