"""Launch the segmentation safety detector, optionally with RViz.

    ros2 launch segmentation_safety detector.launch.py image:=/camera/image_raw rviz:=true

Arguments: image, camera_info, depth (input topics; depth is read with use_depth), config
(parameter YAML), device (overrides the YAML when given), transport (raw or compressed:
then the node reads ``<image>/compressed``, image_transport's name; overrides the YAML
when given), models_dir and anomaly_detector (override the YAML when given), namespace,
use_sim_time, rviz, fixed_frame (RViz's: the images' frame_id, or a frame TF connects it
to), dds_profile (the Fast DDS profile of the node and RViz: same_host for
the shipped shared-memory one, a file, or empty for the environment's).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.launch_description import LaunchDescription
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from segmentation_safety.ros import rviz_config
from segmentation_safety.ros.dds_profile import profile_env

PACKAGE = "segmentation_safety"


def _processes(context):
    # An OpaqueFunction so that `device` overrides the YAML only when it was given, and a
    # bad dds_profile stops the launch before anything starts.
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    share = get_package_share_directory(PACKAGE)
    # The node and RViz get the same profile: a shared-memory-only participant and one
    # with the default transports do not see each other.
    env = profile_env(arg("dds_profile"), share)
    overrides = {"use_sim_time": arg("use_sim_time").lower() in ("true", "1", "yes")}
    if arg("device"):
        overrides["device"] = arg("device")
    if arg("transport"):
        overrides["input_transport"] = arg("transport")
    for name in ("models_dir", "anomaly_detector"):
        if arg(name):
            overrides[name] = arg(name)
    image = arg("image")
    sim_time = overrides["use_sim_time"]
    detector = Node(
        package=PACKAGE,
        executable="detector_node",
        name="segmentation_safety",
        namespace=arg("namespace"),
        parameters=[arg("config"), overrides],
        remappings=[
            ("image", image),
            # Remapping is by exact name: the compressed topic needs its own rule.
            ("image/compressed", f"{image}/compressed"),
            ("camera_info", arg("camera_info")),
            ("depth", arg("depth")),
            ("depth/compressedDepth", f"{arg('depth')}/compressedDepth"),
        ],
        output="screen",
        emulate_tty=True,
        additional_env=env,
    )
    # RViz's displays name the node's topics: under the namespace the node really gets.
    namespace = rviz_config.full_namespace(
        arg("namespace"), context.launch_configurations.get("ros_namespace", "")
    )
    rviz_file = os.path.join(share, "config", "detector.rviz")
    if IfCondition(LaunchConfiguration("rviz")).evaluate(context):
        rviz_file = str(rviz_config.config_for(rviz_file, namespace, arg("fixed_frame")))
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", rviz_file],
        parameters=[{"use_sim_time": sim_time}],
        additional_env=env,
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return [detector, rviz]


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "image", default_value="/camera/image_raw", description="Input image topic"
            ),
            DeclareLaunchArgument(
                "camera_info",
                default_value="/camera/camera_info",
                description="Camera info topic (for hazard markers on the ground)",
            ),
            DeclareLaunchArgument(
                "depth",
                default_value="/camera/depth/image_raw",
                description="Depth image registered to the image (read when use_depth is true)",
            ),
            DeclareLaunchArgument(
                "config",
                default_value=os.path.join(share, "config", "detector.yaml"),
                description="Parameter file of the detector node",
            ),
            DeclareLaunchArgument(
                "device",
                default_value="",
                description="auto, cpu, cuda or cuda:N; empty keeps the config file's value",
            ),
            DeclareLaunchArgument(
                "transport",
                default_value="",
                description="raw or compressed (reads <image>/compressed); empty keeps the "
                "config file's input_transport",
            ),
            DeclareLaunchArgument(
                "models_dir",
                default_value="",
                description="Directory of model bundles (e.g. from segsafe import-weights); "
                "empty keeps the config file's value",
            ),
            DeclareLaunchArgument(
                "anomaly_detector",
                default_value="",
                description="Detector filling the anomaly map; empty keeps the config file's",
            ),
            DeclareLaunchArgument(
                "namespace",
                default_value=rviz_config.SHIPPED_NAMESPACE.lstrip("/"),
                description="Node namespace (RViz's displays follow it)",
            ),
            DeclareLaunchArgument(
                "use_sim_time", default_value="false", description="Use the /clock topic"
            ),
            DeclareLaunchArgument("rviz", default_value="false", description="Start RViz2"),
            DeclareLaunchArgument(
                "fixed_frame",
                default_value=rviz_config.SHIPPED_FIXED_FRAME,
                description="RViz's Fixed Frame: the images' frame_id (the hazard boxes are "
                "in it), or a frame TF connects it to, such as base_link",
            ),
            DeclareLaunchArgument(
                "dds_profile",
                default_value="",
                description="Fast DDS profile of the node and RViz: same_host (the shipped "
                "shared-memory profile: fast delivery on this machine, none to other hosts; "
                "give it to every subscriber), the path of an XML profile, or empty to keep "
                "the environment's",
            ),
            OpaqueFunction(function=_processes),
        ]
    )
