# What both consumer projects do once lora is there (found or added as a subproject): check that lora::lora
# forces nothing on its users, build app from main.cpp, and link the opt-in targets asked for.
#
#   -DLORA_CONSUMER_OPT_IN=native,openblas,openmp   link lora::<name> too; main.cpp then checks each took effect
#   -DLORA_EXPECT_TOOLS=ON|OFF                      lora::<tool> (each of the four tools) must (not) exist;
#                                                   when they must, the build runs each with --version

# lora::lora is plain: no compile options, definitions or link options, and no library beyond Eigen and
# nlohmann_json (the speed targets are opt-in).
foreach(property IN ITEMS INTERFACE_COMPILE_OPTIONS INTERFACE_COMPILE_DEFINITIONS INTERFACE_LINK_OPTIONS)
  get_target_property(value lora::lora ${property})
  if(value)
    message(FATAL_ERROR "lora::lora forces ${property} on its users: ${value}")
  endif()
endforeach()
get_target_property(lora_libraries lora::lora INTERFACE_LINK_LIBRARIES)
if(NOT lora_libraries STREQUAL "Eigen3::Eigen;nlohmann_json::nlohmann_json")
  message(FATAL_ERROR "lora::lora links more than Eigen3::Eigen and nlohmann_json: ${lora_libraries}")
endif()

# The program is shared by both consumer projects: only the way lora is found differs.
add_executable(app "${CMAKE_CURRENT_LIST_DIR}/main.cpp")
target_link_libraries(app PRIVATE lora::lora)

string(REPLACE "," ";" opt_in "${LORA_CONSUMER_OPT_IN}")
foreach(name IN LISTS opt_in)
  if(NOT TARGET lora::${name})
    message(FATAL_ERROR "LORA_CONSUMER_OPT_IN: lora::${name} is not defined")
  endif()
  target_link_libraries(app PRIVATE lora::${name})
  string(TOUPPER "${name}" upper)
  target_compile_definitions(app PRIVATE LORA_CONSUMER_EXPECT_${upper})
  message(STATUS "app links lora::${name}")
endforeach()

if(DEFINED LORA_EXPECT_TOOLS AND NOT LORA_EXPECT_TOOLS STREQUAL "")
  foreach(tool IN ITEMS lora-inspect lora-merge lora-export-gguf lora-import-gguf)
    if(LORA_EXPECT_TOOLS AND NOT TARGET lora::${tool})
      message(FATAL_ERROR "lora::${tool} is not an imported target although the tool is installed")
    elseif(NOT LORA_EXPECT_TOOLS AND TARGET lora::${tool})
      message(FATAL_ERROR "lora::${tool} is an imported target although the tool is not installed")
    endif()
    if(LORA_EXPECT_TOOLS)
      get_target_property(location lora::${tool} IMPORTED_LOCATION)
      message(STATUS "lora::${tool} is ${location}")
      # The imported target must name an executable that runs: CMake puts its path in the command.
      add_custom_command(TARGET app POST_BUILD COMMAND lora::${tool} --version VERBATIM)
    endif()
  endforeach()
endif()
